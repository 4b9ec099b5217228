"""`python -m kv_paged demo` (the main job): the embedded model and `--model PATH` on a local checkpoint.

The checkpoint is a tiny random Llama saved with save_pretrained next to a word-level tokenizer built
with `tokenizers`, so the string path of the demo (tokenized chat, decoded replies) runs offline.
"""

from __future__ import annotations

import re

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from kv_paged import __main__ as cli  # noqa: E402  (after the importorskip)
from kv_paged import demo  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table_value(text: str, row: str) -> str:
    match = re.search(rf"^{re.escape(row)}\s+(.+)$", text, re.MULTILINE)
    assert match, f"row {row!r} missing from the metrics table:\n{text}"
    return match.group(1)


def test_demo_embedded_model(tmp_path, capsys):
    out = tmp_path / "plot.png"
    args = ["--users", "8", "--max-new-tokens", "24", "--num-blocks", "96", "--out", str(out)]
    assert cli.main(["demo", *args, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert table_value(text, "requests finished") == "16"  # 8 users x 2 turns
    hit_rate = float(table_value(text, "prefix-cache hit rate").split("%")[0])
    assert hit_rate > 50.0, "every user shares the 160-token system prompt and turn 2 reuses turn 1"
    assert int(table_value(text, "forks (n > 1)")) == 4  # users 3 and 7 ask for n = 2, both turns
    peak_shared = int(table_value(text, "peak KV blocks: paged + shared").split()[0])
    peak_unshared = int(table_value(text, "peak KV blocks: paged, no sharing"))
    assert 0 < peak_shared < peak_unshared <= 96 * 4
    assert "failed" not in text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "<s>", "</s>"] + sorted(
        set(
            re.findall(
                r"\w+|[^\w\s]",
                "You are a helpful assistant for a hardware store. Answer briefly, politely, and "
                "only about the store's products, opening hours, delivery and returns. User what can "
                "you tell me about drills paint ladders garden tools lamps ? : Assistant 0 1 2 3",
            )
        )
    )
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    config = transformers.LlamaConfig(
        vocab_size=len(words),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_demo_local_checkpoint_with_tokenizer(checkpoint, tmp_path, capsys):
    out = tmp_path / "plot.png"
    args = ["--model", str(checkpoint), "--users", "4", "--max-new-tokens", "8", "--out", str(out)]
    assert demo.main([*args, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"demo: {checkpoint.name}" in text
    assert table_value(text, "requests finished") == "8"
    assert re.search(r"^user 0, turn 2 reply: '.*'$", text, re.MULTILINE)
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_cli_usage_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert cli.main([]) == 2
    assert cli.main(["serve"]) == 2
    assert "unknown command 'serve'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--device", "cuda:0"] if not demo.torch.cuda.is_available() else ["--bogus"])
