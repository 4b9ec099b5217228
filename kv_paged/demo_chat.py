"""The demo's chat workload: every user's first prompt, and their second turn once a reply is in.

Design decision: a second turn is built from the reply the user saw, as a chat app builds it: through
the tokenizer's chat template (system, question, reply text, next question) on a chat model; previous
prompt + reply text + next question on a tokenizer without a template; previous prompt + reply ids +
random ids on the embedded random model. Each extends the first turn, so the prefix cache serves it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

SYSTEM_PROMPT = (
    "You are Sam, the friendly assistant of Northwind Hardware, a family-run hardware store in "
    "Portland. Answer in one to three short sentences. Store facts: we are open Monday to Saturday "
    "from 8am to 7pm and on Sunday from 10am to 4pm. Delivery is free for orders over $50 within 20 "
    "miles, otherwise it costs $8. Returns are accepted within 30 days with the receipt. We sell "
    "power tools (drills, saws, sanders), hand tools, paint and brushes, garden tools, lighting, "
    "plumbing and electrical supplies. Paint mixing is free and takes about ten minutes. Large "
    "equipment such as tile saws and floor sanders can be rented from $25 a day. If you do not know "
    "something, say so and suggest calling the store at 555-0134."
)

# (first question, follow-up question) per user, cycled when there are more users.
QUESTIONS: list[tuple[str, str]] = [
    ("When are you open on Sunday?", "And on Saturday?"),
    ("Do you deliver to my house?", "How much is delivery for a $30 order?"),
    ("Can I return a drill I bought last week?", "What do I need to bring?"),
    ("What kind of paint is best for a bathroom?", "Do you mix paint colors?"),
    ("I want to rent a floor sander. Is that possible?", "How much is it per day?"),
    ("What tools do I need to hang a shelf?", "Which drill bit should I use for concrete?"),
    ("What is the capital of France?", "Thanks! And the capital of Italy?"),
    ("How do I fix a leaking faucet?", "Do you sell replacement washers?"),
    ("Do you sell LED light bulbs?", "Are they cheaper to run than old bulbs?"),
    ("How should I clean paint brushes?", "How long do good brushes last?"),
    ("Which tool cuts ceramic tiles?", "Can I rent one instead of buying?"),
    ("What is your phone number?", "Can someone there help me with plumbing?"),
    ("I need a gift for someone who loves gardening.", "What is a good cheap option?"),
    ("Which screws should I use for wood?", "What about drywall?"),
    ("Do you have sandpaper?", "Which grit smooths a table top?"),
    ("Is paint mixing free?", "How long does it take?"),
]

# Topics of the plain-tokenizer workload (a checkpoint whose tokenizer has no chat template).
TOPICS = ["drills", "paint", "ladders", "delivery", "returns", "opening hours", "garden tools"]


@dataclass
class ChatWorkload:
    """What run_chat serves. follow_up(user, reply_ids, reply_text) -> the user's second prompt."""

    first: list[list[int]]  # per user: the first turn's prompt ids
    follow_up: Callable[[int, list[int], str], list[int]]
    system_tokens: int  # length of the prompt prefix every user shares
    questions: list[tuple[str, str]] | None = None  # per user, shown beside the replies


def random_chat(num_users: int, system_len: int, vocab: int, seed: int) -> ChatWorkload:
    """Random token ids (the embedded random-weight model): a shared system prefix, 12-48 ids of
    question per turn."""
    rng = random.Random(seed)
    special = 8  # keep the lowest ids (pad, bos, eos-like) out of the text
    text = lambda n: [rng.randrange(special, vocab) for _ in range(n)]
    system = text(system_len)
    first = [system + text(rng.randint(12, 48)) for _ in range(num_users)]
    second = [text(rng.randint(12, 48)) for _ in range(num_users)]
    return ChatWorkload(
        first=first,
        follow_up=lambda u, reply_ids, _text: first[u] + list(reply_ids) + second[u],
        system_tokens=len(system),
    )


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def template_chat(num_users: int, tokenizer, seed: int) -> ChatWorkload:
    """Real questions about a store, through the tokenizer's chat template: [system, question] and
    then [system, question, reply, follow-up], each ending with the assistant's turn header."""
    order = random.Random(seed).sample(QUESTIONS, len(QUESTIONS))
    questions = [order[u % len(order)] for u in range(num_users)]

    def render(messages: list[dict[str, str]]) -> list[int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return _encode(tokenizer, text)

    system = {"role": "system", "content": SYSTEM_PROMPT}
    turn1 = lambda u: [system, {"role": "user", "content": questions[u][0]}]
    turn2 = lambda u, reply: [
        *turn1(u),
        {"role": "assistant", "content": reply},
        {"role": "user", "content": questions[u][1]},
    ]
    first = [render(turn1(u)) for u in range(num_users)]
    shared = render([system])
    common = next((i for i, (a, b) in enumerate(zip(shared, first[0])) if a != b), len(shared))
    return ChatWorkload(
        first=first,
        follow_up=lambda u, _ids, reply: render(turn2(u, reply)),
        system_tokens=common,
        questions=questions,
    )


def text_chat(num_users: int, tokenizer, seed: int) -> ChatWorkload:
    """ "User i: <question>" lines after a plain-text system prompt, for a tokenizer without a chat
    template; the second turn appends the reply's text, re-encoded, and the next question."""
    rng = random.Random(seed)
    system = list(tokenizer(SYSTEM_PROMPT)["input_ids"])
    ask = lambda: f"what can you tell me about {rng.choice(TOPICS)}?"
    questions = [(ask(), ask()) for _ in range(num_users)]
    line = lambda u, turn: _encode(tokenizer, f"\nUser {u}: {questions[u][turn]}\nAssistant:")
    first = [system + line(u, 0) for u in range(num_users)]
    return ChatWorkload(
        first=first,
        follow_up=lambda u, _ids, reply: first[u] + _encode(tokenizer, reply) + line(u, 1),
        system_tokens=len(system),
        questions=questions,
    )


def chat_workload(
    num_users: int, seed: int, tokenizer=None, vocab: int = 0, system_len: int = 0
) -> ChatWorkload:
    """The workload that fits the model: a chat template's, a plain tokenizer's, or random ids."""
    if tokenizer is None:
        return random_chat(num_users, system_len, vocab, seed)
    if getattr(tokenizer, "chat_template", None):
        return template_chat(num_users, tokenizer, seed)
    return text_chat(num_users, tokenizer, seed)
