"""The GPU check script's CPU dry run and the precision tool keep working without a GPU; the benchmark tools
end to end on the tiny preset. The tools run in this process (torch and transformers are imported here
already; a fresh interpreter would spend 3-6 s on that before any work) except where a fresh process is the
thing measured (the load probes, the soup's peak memory) or the script is the thing tested (gpu_check.sh)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One --workdir for the tools: a random tiny checkpoint is written once and read by every tool after."""
    return tmp_path_factory.mktemp("tools")


def _tool(name: str, *args) -> int:
    """tools/<name>.py's main(args) run here (tools/ holds scripts, not a package: loaded from its path);
    torch's RNG and thread count restored after."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    try:
        return module.main([str(a) for a in args])
    finally:
        torch.set_rng_state(rng)
        torch.set_num_threads(threads)


def _every_row_measured(rows):
    """Both sides timed, the ratio theirs / ours, a positive floor: what every bench row must carry."""
    for row in rows:
        assert row["points"]["min_s"] > 0 and row["transformers"]["min_s"] > 0 and row["floor_s"] > 0, row
        assert row["ratio"] == row["transformers"]["min_s"] / row["points"]["min_s"]


def test_gpu_check_dry_run(tmp_path):
    """tools/gpu_check.sh --dry-run: every step of the GPU run, small and on the CPU, and the record it writes
    (what the rows measured is read from their fields, not their labels)."""
    run = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                         env={**os.environ, "OUT": str(tmp_path),
                              "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "== points gpu_check (cpu) ==" in run.stdout and "tests collected" in run.stdout
    rows = json.loads((tmp_path / "precision.json").read_text())["rows"]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16", "float16"]
    assert rows[0]["max_abs"] < 1e-4 and rows[1]["transformers_own"] > 0
    tune = json.loads((tmp_path / "tune.json").read_text())
    assert {r["kind"] for r in tune["rows"]} == {"vision", "causal", "cached"}
    assert all(r["sdpa_s"] > 0 and r["triton_auto_s"] > 0 for r in tune["rows"])
    record = json.loads(next(tmp_path.glob("cpu-*.json")).read_text())
    bench = record["bench"]["rows"]
    _every_row_measured(bench)
    assert sorted((r["kind"], r.get("batch"), r.get("compiled")) for r in bench if r["kind"] == "decode") == [
        ("decode", 1, False), ("decode", 1, True), ("decode", 4, False), ("decode", 4, True)]
    assert record["bench"]["quick"] and len([r for r in bench if r["kind"] == "prefill"]) == 2
    assert sorted(r["images"] for r in bench if r["kind"] == "vision") == [1, 1, 4]
    assert {r["kernel"] for r in record["int8_products"]["rows"]} >= {
        "F.linear", "int8, _weight_int8pack_mm", "int8, compiled dequantize-multiply (eager backend)"}
    for scheme in ("int8", "int4"):
        run = record[f"bench_{scheme}"]
        assert run["quantize"]["scheme"] == scheme and {(r["batch"], r["compiled"]) for r in run["rows"]} == {
            (1, False), (1, True), (4, False), (4, True)}


def test_points_bench_load_rows(workdir, tmp_path, capsys):
    """`points bench --rows load` on the tiny preset (the other rows, and `python -m points bench` as a process
    of its own, run in the dry run above): both layouts loaded in fresh processes against transformers'
    from_pretrained, peak memory measured, the machine described in the JSON, the table printed."""
    from points.tooling import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--repeat", "1", "--quick", "--rows", "load",
                       "--workdir", str(workdir), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    _every_row_measured(result["rows"])
    assert [(r["kind"], r["layout"]) for r in result["rows"]] == [("load", "released"), ("load", "converted")]
    assert all(len(r["points"]["runs"]) == 1 and r["points"]["peak_bytes"] > 0 for r in result["rows"])
    assert {"cpu", "threads", "torch", "transformers"} <= set(result["machine"])
    printed = capsys.readouterr().out
    assert "ratio" in printed and "of floor" in printed


def test_points_bench_rejects_bad_arguments(tmp_path, capsys):
    """One line and exit 2, before any measuring: a flag out of range, a device the machine lacks, a --json
    whose folder is missing (found before the run, not after it)."""
    from points.tooling import bench

    with pytest.raises(SystemExit) as e:
        bench.main(["--repeat", "0"])
    assert e.value.code == 2 and "--repeat must be >= 1" in capsys.readouterr().err
    assert bench.main(["--preset", "tiny", "--device", "bogus"]) == 2
    assert capsys.readouterr().err.startswith("error: device 'bogus' is not a valid torch device")
    assert bench.main(["--preset", "tiny", "--json", str(tmp_path / "missing" / "b.json")]) == 2
    assert capsys.readouterr().err == (f"error: --json {tmp_path / 'missing' / 'b.json'}: the folder "
                                       f"{tmp_path / 'missing'} does not exist; create it first\n")


def test_bench_run_tool_tiny(workdir, tmp_path, tokenizer_built_once):
    """tools/bench_run.py end to end on the tiny preset, each item its own max_new_tokens: both mixes measured,
    the scheduler's and the fixed batches' replies identical to the one-at-a-time loop (float32)."""
    out = tmp_path / "run.json"
    assert _tool("bench_run", "--preset", "tiny", "--dtype", "float32", "--items", 6, "--new-range", 2, 6,
                 "--batch-size", 3, "--workdir", workdir, "--json", out) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["mix"] for r in rows] == ["text", "images"] and [r["images"] for r in rows] == [0, 2]
    assert all(r["identical_replies"] == 6 and r["identical_fixed"] == 6 and r["ratio"] > 0 and r["ratio_fixed"] > 0
               and r["prefill_vision_floor_s"] > 0 for r in rows)


def test_bench_ocr_tool_tiny(workdir, tmp_path, tokenizer_built_once):
    """tools/bench_ocr.py on a tiny Reader in float32: every row timed against a positive floor, the official
    path writing exactly --new tokens a page, and greedy pages with n-gram drafts the very tokens of those
    without (float32)."""
    out = tmp_path / "ocr.json"
    assert _tool("bench_ocr", "--size", "reader-tiny", "--dtype", "float32", "--pages", 3, "--baseline-pages", 1,
                 "--new", 6, "--max-pixels", 20000, "--rows", "bf16", "speculative", "--bursts", 1, "--workdir", workdir,
                 "--json", out) == 0
    result = json.loads(out.read_text())
    timed = [v for v in result.values() if isinstance(v, dict) and "pages_per_min" in v]
    assert len(timed) == 4 and all(v["pages_per_min"] > 0 and v["of_floor"] > 0 for v in timed)
    assert result["ratio_bf16"] > 0 and result["speculative"]["same_pages"] == 3


def test_bench_eval_tool_tiny(workdir, tmp_path, tokenizer_built_once, capsys):
    """tools/bench_eval.py on the tiny preset: points eval and points run timed on the same items, the same
    replies."""
    out = tmp_path / "eval.json"
    assert _tool("bench_eval", "--preset", "tiny", "--dtype", "float32", "--rows", 3, "--new", 3, "--repeat", 1,
                 "--workdir", workdir, "--json", out) == 0
    result = json.loads(out.read_text())
    assert result["same"] and result["ratio"] > 0 and all(len(v) == 1 for v in result["seconds"].values())


def test_bench_prefix_tool_tiny(workdir, tmp_path):
    """tools/bench_prefix.py on the tiny preset: the cached second turn reuses turn 1 (all of its prompt)."""
    out = tmp_path / "prefix.json"
    assert _tool("bench_prefix", "--preset", "tiny", "--history", 100, "--repeat", 1, "--workdir", workdir,
                 "--json", out) == 0
    result = json.loads(out.read_text())
    cache, plain = result["rows"]
    assert cache["reused_tokens"] >= result["turn1_tokens"] and plain["reused_tokens"] == 0
    assert cache["prefilled_tokens"] + cache["reused_tokens"] == result["turn2_tokens"] == plain["prefilled_tokens"]


def test_bench_soup_tool_tiny(tmp_path, capsys):
    """tools/bench_soup.py on three tiny checkpoints: both ways timed (each in a fresh process, as the tool
    measures them); ours is the mean rounded once (0 elements differ), the official way's bf16 sum is not."""
    assert _tool("bench_soup", "--preset", "tiny", "--inputs", 3, "--rounds", 1, "--quick", "--workdir", tmp_path) == 0
    printed = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in printed.splitlines() if line.startswith("| ")}
    assert rows["points soup"][2].strip() == "0.0000%" and rows["official way"][2].strip() != "0.0000%"
    assert "official / ours time" in printed


def test_profile_step_tool_tiny(workdir, capsys):
    """tools/profile_step.py on the tiny preset: the step split into the kernel's products and the rest."""
    assert _tool("profile_step", "--preset", "tiny", "--prompt", 8, "--steps", 2, "--workdir", workdir) == 0
    printed = capsys.readouterr().out
    assert "the products" in printed and "ATen ops:" in printed


# config fields (besides rope, head_dim and bias, checked apart) that decide what transformers computes
_RUN_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "rms_norm_eps", "hidden_act", "tie_word_embeddings")


@pytest.mark.parametrize("size", ["7b", "reader-3b", "gui-8b", "versavit-8b"])
def test_bench_reference_is_the_members_own_transformers_model(size):
    """The class and config `points bench` builds its transformers side from (reference.causal_lm, on the
    meta device) are what transformers itself makes of the member's released llm_config: the same class, the
    same shapes, head_dim, eps, theta and tie (POINTS-Reader's 151,936-row head tied to its embedding). For
    POINTS-1.5, whose CustomLlama config transformers cannot read, the released facts: untied, 152,064 rows."""
    from transformers import CONFIG_MAPPING

    from points.io.config import from_hf_dict
    from points.model import family
    from points.tooling import reference

    m, llm, vision = family.size(size)
    ours = reference.causal_lm(from_hf_dict(family.config_json(m, llm, vision)).decoder)
    if m.naming == "custom_llama":
        assert type(ours).__name__ == "Qwen2ForCausalLM" and not ours.config.tie_word_embeddings
        assert ours.config.vocab_size == 152064 and ours.lm_head.weight is not ours.model.embed_tokens.weight
        return
    theirs = CONFIG_MAPPING[llm["model_type"]](**llm)
    assert type(ours).__name__ == llm["architectures"][0]
    assert {f: getattr(ours.config, f) for f in _RUN_FIELDS} == {f: getattr(theirs, f) for f in _RUN_FIELDS}
    assert ours.config.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"]
    head_dim = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # noqa: E731
    released = llm.get("head_dim", llm["hidden_size"] // llm["num_attention_heads"])
    assert head_dim(ours.config) == head_dim(theirs) == released
    assert getattr(ours.config, "attention_bias", None) == getattr(theirs, "attention_bias", None)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == (size == "reader-3b")


@pytest.mark.parametrize("size", ["reader-tiny", "gui-tiny"])
def test_bench_reference_gives_our_logits(size):
    """transformers' side of `points bench` (reference.transformers_decoder) on a tiny Reader (tied
    Qwen2ForCausalLM) and GUI-G (Qwen3ForCausalLM, head_dim 24 against 64 / 4 heads) decoder: our very tensors
    (a tied head is our embedding, no copy) and our logits at fp32 tolerance. A tied decoder whose lm_head
    is not its embedding is refused, not silently measured as another model."""
    from points.tooling import reference
    from points.tooling.synthetic import random_decoder

    decoder = random_decoder(size, dtype=torch.float32)
    assert (decoder.lm_head.weight is decoder.embed.weight) == decoder.cfg.tied  # (one Parameter, as points.load)
    llm = reference.transformers_decoder(decoder)
    assert llm.model.embed_tokens.weight.data_ptr() == decoder.embed.weight.data_ptr()
    assert (llm.lm_head.weight is llm.model.embed_tokens.weight) == decoder.cfg.tied
    ids = torch.randint(0, decoder.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(decoder(ids), llm(ids).logits)
    if decoder.cfg.tied:  # untied by hand, then changed
        decoder.lm_head.weight = torch.nn.Parameter(decoder.embed.weight.detach().clone())
        decoder.lm_head.weight.data[0, 0] += 1
        with pytest.raises(ValueError, match="lm_head does not hold the embedding's numbers"):
            reference.transformers_decoder(decoder)
