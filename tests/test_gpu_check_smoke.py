"""benchmarks/gpu_check.py --cpu-smoke end to end in a subprocess: the GPU script must not rot unseen."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What the GPU host's python lacks (it has torch, transformers 5.17, huggingface_hub 1.33, accelerate, pillow,
# pyarrow, tqdm): the scripts that run there must not need these, even lazily on their paths.
ABSENT_ON_GPU_HOST = ("pandas", "datasets", "exifread", "img2dataset")
# The scripts start no section once their --budget-s (120 s in --cpu-smoke) is spent: on a loaded CI machine
# decode_diag's smoke skipped its graph section. The tests check that every section runs, whatever the pace.
NO_BUDGET = ("--budget-s", "900")


def gpu_host_env(tmp_path: Path) -> dict:
    """This venv's environment with the GPU host's absent packages shadowed by ones that fail to import as a
    missing one does (so pyarrow's optional pandas check, for one, takes its without-pandas path)."""
    shadow = tmp_path / "absent_on_gpu_host"
    for name in ABSENT_ON_GPU_HOST:
        (shadow / name).mkdir(parents=True, exist_ok=True)
        (shadow / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError({f'No module named {name!r} (absent on the GPU host)'!r}, name={name!r})\n")
    path = os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def test_gpu_check_cpu_smoke_writes_every_section(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_check import SECTIONS
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out",
                           str(tmp_path), *NO_BUDGET, "--pipeline-runs", "plain", "overlap", "overlap_graph",
                           "--profile", "graph_flex"], cwd=tmp_path, env=gpu_host_env(tmp_path), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(SECTIONS) <= set(result), set(SECTIONS) - set(result)
    assert not result["skipped"]
    assert [x["batch"] for x in result["eager"]] == [2, 4] and [x["batch"] for x in result["compiled"]] == [2, 4]
    assert [x["batch"] for x in result["graph"]] == [2, 4] and [x["batch"] for x in result["graph_flex"]] == [4]
    weights = result["fp8_weights"]  # fp8 last, on the model quantized in place
    cpu_fp8 = "error" not in weights  # a torch without a row-wise FP8 GEMM on the CPU (2.11) says so, runs none
    assert [x["batch"] for x in result["prefill_eager"]] == [4] and [x["batch"] for x in result["fp8"]] == [4] * cpu_fp8
    assert cpu_fp8 or "per-tensor" in weights["error"], weights
    assert [x["batch"] for x in result["whole_tower"]] == [4] and [x["batch"] for x in result["kv_fp8"]] == [4]
    # kv_fp8: the float8 cache, on flex (a CPU converts it for flex first; a card's flex reads it as it is)
    assert result["kv_fp8"][0]["kv_cache_dtype"] == "float8_e4m3fn" and result["kv_fp8"][0]["attention"] == "flex"
    assert result["graph_flex"][0]["kv_cache_dtype"] == "float32"
    # Every run's tower in chunks of 2 images (vision_chunks.py), whole_tower's over the whole batch.
    assert {x["vision_chunk_rows"] for x in result["graph_flex"] + result["compiled"]} == {2}
    assert result["whole_tower"][0]["vision_chunk_rows"] == 0
    if cpu_fp8:  # its layers, the logits' drift on random weights
        assert weights["fp8_layers"] > 0 and 0 < weights["logits_relative_error"] < 1, weights
        before, after = weights["linear_weight_bytes"]
        assert after * 3 < before and "fp8 weights" in (tmp_path / "gpu_check.md").read_text()  # (fp32 on the CPU)
    graphs = (result["graph"] + result["graph_flex"] + result["prefill_eager"] + result["whole_tower"]
              + result["kv_fp8"] + result["fp8"])
    for entry in result["eager"] + result["compiled"] + graphs:
        assert "error" not in entry, entry
        assert entry["img_s"] > 0 and entry["tokens_s"] > 0
        assert entry["generate_share"] is None if entry in graphs else 0 < entry["generate_share"] <= 1
    # The decode step's graph: whole_tower's is graph_flex's; kv_fp8's (another cache) its own; prefill_eager's is
    # graph_flex's, but torch 2.11 + transformers 5.17 (the GPU host's) guard it on each decoder layer's compiled
    # call, which an eager prefill removes: rebuilt once, in the warm-up. Each prefill ran as labelled.
    for entry in result["compiled"] + graphs:
        built = {0} if entry in result["whole_tower"] else {0, 1} if entry in result["prefill_eager"] else {1}
        assert entry["graphs_built"] in built and entry["graph_breaks"] == 0
        how = "eager" if entry in result["prefill_eager"] else "compiled"
        assert entry["vision_tower"] == entry["language_model_prefill"] == how, entry
        assert (entry["prefill_warmup_s"] is None) is (how == "eager"), entry
    assert all(entry["vision_tower"] == entry["language_model_prefill"] == "eager" for entry in result["eager"])
    # --profile: one more graph_flex batch under the profiler, by kind of op (the CPU's aten ops: no kernels)
    profile = result["graph_flex"][0]["profile"]
    assert profile["rows"] == 4 and profile["timing"] == "CPU time of aten ops", profile
    assert profile["prefill_ms_per_image"]["gemm"] > 0 and profile["batch_ms_per_image"]["gemm"] > 0, profile
    # the decode is the batch less its prefill, two profiled runs apart: on a loaded CPU that difference can come
    # out below 0 (CI once: -0.541 ms a GEMM), so the arithmetic is checked, not its sign
    assert profile["decode_ms_per_image"] == {kind: round(ms - profile["prefill_ms_per_image"].get(kind, 0.0), 3)
                                              for kind, ms in profile["batch_ms_per_image"].items()}, profile
    # (the same two runs: a loaded CI host once timed the whole batch at 5.8 ms an image, its prefill at 12.7)
    assert profile["kernel_ms_per_image"]["batch"] > 0 and profile["kernel_ms_per_image"]["prefill"] > 0
    assert "gemm" in (tmp_path / profile["top_kernels_file"]).read_text()
    assert all("profile" not in entry for entry in result["graph"] + result["fp8"])  # only the kinds asked for
    assert result["loop"]["img_s"] > 0
    assert {name: x["images"] for name, x in result["loader"].items()} == {"fast": 6, "device": 6}
    for key, label in (("pipeline", "compiled"), ("pipeline_overlap", "compiled, --vision-overlap"),
                       ("pipeline_overlap_graph", "--decode-loop graph --vision-overlap")):
        pipe = result[key]  # the whole pipeline.run over the built model: every image captioned, exit 0
        assert pipe["exit_code"] == 0 and pipe["captioned"] == pipe["images"] == 12 and not pipe["failed"]
        assert pipe["retried"] == 0 and pipe["generated_captions_s"] == pipe["captioning_img_s"] > 0
        assert pipe["vision_overlap"] is ("overlap" in key)
        assert pipe["decode_loop"] == ("graph" if key.endswith("graph") else "generate")
        # 3 batches of 4: the steady rate is the middle one's (neither compilation nor the unshared last)
        assert len(pipe["batch_s"]) == 2 and pipe["steady_img_s"] > 0
        assert abs(4 / pipe["steady_img_s"] - pipe["batch_s"][0]) <= 0.0006  # batch_s: rounded to 1 ms
        assert f"| whole pipeline, {label} (12 images, steady, batch 2 to n-1, 0 retried) | 4 |" in \
            (tmp_path / "gpu_check.md").read_text()
    flop = result["flop_per_image"]
    assert abs(sum(v for k, v in flop.items() if k != "total") - flop["total"]) <= 1e-3 * flop["total"]
    assert result["roofs"]["by_batch"] and "| compiled | 4 |" in (tmp_path / "gpu_check.md").read_text()


def test_a_kill_during_the_profile_keeps_the_timed_batches(tmp_path):
    """gpu_ab.sh kills gpu_check.py at its part's timeout; a profile (a whole extra batch) is the likeliest place.
    The timed batches it follows are on disk already, marked as such."""
    killed_in_profile = (
        "import os, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "import gpu_profile; gpu_profile.profile_batch = lambda *a, **k: os._exit(9)\n"
        "import gpu_check; gpu_check.main(['--cpu-smoke', '--out', sys.argv[3], '--eager-batches', "
        "'--compiled-batches', '--graph-batches', '--prefill-eager-batches', '--fp8-batches', "
        "'--whole-tower-batches', '--pipeline-images', '0', '--loop-images', '0', '--profile', 'graph_flex', "
        f"'--budget-s', '{NO_BUDGET[1]}'])\n")
    proc = subprocess.run([sys.executable, "-c", killed_in_profile, str(REPO / "benchmarks"), str(REPO), str(tmp_path)],
                          cwd=tmp_path, env=gpu_host_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-3000:]
    entry, = json.loads((tmp_path / "gpu_check.json").read_text())["graph_flex"]
    assert entry["img_s"] > 0 and entry["profile"] == "not finished"
    assert "profile, graph_flex batch 4: not finished" in (tmp_path / "gpu_check.md").read_text()


def test_flop_per_image_of_gemma_3_4b():
    """The numbers the GPU check reports for 4B at 896 px, 316 prompt tokens, 200 new tokens."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_roofs import flop_per_image, roofs
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from vlm_caption.tiny_model import build_config, build_tokenizer

    config = build_config("gemma-3-4b", build_tokenizer())
    tera = {k: round(v / 1e12, 2) for k, v in flop_per_image(config, 316, 200).items()}
    assert tera["vision_linear"] == 3.37 and tera["vision_attention"] == 2.09
    assert tera["prefill"] == 2.04 and abs(tera["decode"] - 1.58) < 0.015
    h100 = roofs(config, 316, 200, 64, 989e12, 3.35e12)
    assert 50 < h100["roof_img_s"] < 60 and 100 < h100["compute_only_img_s"] < 120


def test_decode_diag_cpu_smoke_splits_prefill_and_decode(tmp_path):
    """benchmarks/decode_diag.py --cpu-smoke: every section it was not told to skip, with a decode step."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_diag.py"), "--cpu-smoke", "--out",
                           str(tmp_path), *NO_BUDGET, "--skip", "hf_static", "gil"], cwd=tmp_path,
                          env=gpu_host_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "decode_diag.json").read_text())
    # Every split ran both lengths; their times are not compared (a loaded machine can stall the short run).
    for name in ("compiled", "compiled_repeat_kv", "graph", "eager"):
        split = result[name]
        assert split["short_s"] > 0 and split["long_s"] > 0 and isinstance(split["decode_step_ms"], float), split
    assert result["compiled"]["grouped_attention"] is True
    # the decode step's graph, and the prefill's: the vision tower's, the projector's, the language model's
    assert result["counters"]["stats"]["unique_graphs"] == 4 and not result["counters"].get("graph_break")
    assert all(result["profile"][run]["top_cpu_ms"] for run in ("generate", "prefill"))
    prefill = result["prefill"]  # the prefill + first token, the language model eager vs compiled: the same tokens
    assert prefill["eager_ms_per_image"] > 0 and prefill["compiled_ms_per_image"] > 0
    assert prefill["same_first_token"] == 1 and prefill["graph_breaks"] == 0
    assert "== prefill" in (tmp_path / "profile.txt").read_text()
    # the grouped attention and FlexAttention against transformers' sdpa, same numbers, at two cache lengths
    assert len({row["cache_len"] for row in result["attention"]}) == 2
    for row in result["attention"]:
        assert row["grouped_ms"] > 0 and row["transformers_sdpa_ms"] > 0 and row["flex_ms"] > 0, row
        assert row["max_abs_diff"] < 1e-4 and row["flex_max_abs_diff"] < 1e-4, row
        # the grouped attention pinned to one sdpa kernel (on a GPU: efficient and cuDNN), same numbers
        assert row["grouped_math_ms"] > 0 and row["grouped_math_max_abs_diff"] < 1e-4, row
    assert result["vision"]["vision_s"] > 0 and result["vision"]["vision_compiled_s"] > 0
    # the vision tower on each sdpa kernel the CPU has, same features as torch's own pick
    for kernel in ("flash", "math"):
        timing = result["vision"]["sdpa_kernels"][kernel]
        assert timing["ms_per_image"] > 0 and timing["max_abs_diff"] < 1e-4, timing
    assert "gil" not in result and "hf_static" not in result


def test_bench_attention_times_the_vision_towers_attention_by_kernel(tmp_path):
    """bench_attention.py --tower (the GPU host's absent packages shadowed): torch's pick, each kernel the CPU
    has and FlexAttention, the same numbers, as ms an image over the tower's layers and TFLOP/s."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_attention.py"), "--tower", "--preset",
                           "small", "--batch", "2", "--rounds", "1", "--calls", "1"], cwd=tmp_path,
                          env=gpu_host_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.splitlines()[-1])
    assert (row["tokens"], row["heads"], row["head_dim"], row["layers"]) == (256, 4, 32, 2)  # the preset's SigLIP
    for side in ("sdpa", "flash", "math", "flex"):
        assert row[f"{side}_ms_per_image"] > 0 and row[f"{side}_tflop_s"] >= 0, side
    for side in ("flash", "math", "flex"):
        assert row[f"{side}_max_abs_diff"] < 1e-4, side


def test_gpu_ab_script_passes_flags_its_scripts_know(tmp_path):
    """benchmarks/gpu_ab.sh is the next GPU session's whole run: a flag a script no longer takes would cost
    that session its device time. Every python call in it parses with the script's own argparse."""
    import re
    import shlex

    text = (REPO / "benchmarks" / "gpu_ab.sh").read_text().replace("\\\n", " ")
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_ab.sh")]).returncode == 0
    calls = re.findall(r'benchmarks/(\w+)\.py (.*?)(?:>|$)', text, flags=re.M)
    assert {name for name, _ in calls} == {"bench_attention", "bench_continuous", "bench_fp8", "bench_retry_pool",
                                           "decode_diag", "gpu_check"}
    # the gpu_check function's own flags, then each part's ("$@")
    parts = re.findall(r'^\s*(?:want \w+ && )?gpu_check (\w+) \d+ (.*)$', text, flags=re.M)
    assert {part for part, _ in parts} == {"check", "thresh", "kv8", "prof", "fp8", "big"}
    calls = [(name, flags.replace('"$part"', part).replace('"$@"', more)) for name, flags in calls
             for part, more in (parts if '"$@"' in flags else [("", "")])]
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        for name, flags in calls:
            module = __import__(name)
            args = shlex.split(flags.replace('"$out', f'"{tmp_path}'))
            module.parse_args(args)  # argparse exits (SystemExit) on an unknown flag or a bad value
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_the_captioning_script_runs_and_pushes_without_what_the_gpu_host_lacks(tmp_path, tiny_model_dir,
                                                                               sample_data_dir, hub_stub):
    """batched_image_inference.py end to end with the tiny Gemma 3, pushing to the Hub stub, with the GPU
    host's absent packages shadowed: neither the captioning nor the publishing path imports them."""
    env = {**gpu_host_env(tmp_path), "HF_HUB_OFFLINE": "0", "HF_TOKEN": hub_stub.token,
           "HF_HOME": str(tmp_path / "hf_home")}
    probe = subprocess.run([sys.executable, "-c", "import pandas"], env=env, capture_output=True, text=True)
    assert "absent on the GPU host" in probe.stderr  # the shadow works
    proc = subprocess.run([sys.executable, str(REPO / "batched_image_inference.py"), "--model", str(tiny_model_dir),
                           "--data-dir", str(sample_data_dir), "--checkpoint-dir", str(tmp_path / "ckpt"),
                           "--hf-repo", "tester/gpu-host", "--hub-endpoint", hub_stub.endpoint,
                           "--max-tokens", "4", "--max-images", "6"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The sample data's first six rows hold one broken image: a recorded failure, not an import error.
    assert "captioned 5 images" in proc.stdout and "failed 1 (decode 1)" in proc.stdout
    assert len(hub_stub.read_rows("tester/gpu-host")) == 5


def test_gpu_ab_help_and_a_wrong_part_run_nothing(tmp_path):
    """`gpu_ab.sh --help` prints its usage (it took --help for OUT_DIR: mkdir printed its own help, then both
    parts started); an unknown part is refused before anything runs (it used to do nothing and exit 0)."""
    script = REPO / "benchmarks" / "gpu_ab.sh"
    env = {**os.environ, "PYTHON": "false"}  # a python that ran would fail the checks below
    shown = subprocess.run(["bash", str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and "gpu_ab.sh OUT_DIR [kv8|prof|diag|fp8|thresh|cont|check|big|retry|all]" in shown.stdout, shown.stderr
    assert "set -uo" not in shown.stdout and "bench_continuous.log" in shown.stdout  # the whole header, only
    wrong = subprocess.run(["bash", str(script), str(tmp_path / "out"), "chek"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "unknown part 'chek'" in wrong.stderr
    listed = subprocess.run(["bash", str(script), str(tmp_path / "out"), "check,cnt"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 2 and "unknown part 'cnt'" in listed.stderr
    assert list(tmp_path.iterdir()) == []  # no OUT_DIR, no '--help' directory


def test_gpu_ab_parts_in_one_call_share_its_deadline(tmp_path):
    """`gpu_ab.sh OUT check,cont` runs both parts in one device call: each part's timeout is cut to what is left
    of GPU_AB_SECONDS, and a part with under a minute left is skipped and says so (never started to be killed)."""
    script = REPO / "benchmarks" / "gpu_ab.sh"
    env = {**os.environ, "PYTHON": "false", "GPU_AB_SECONDS": "30"}
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out"), "check,cont"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    said = (tmp_path / "out" / "gpu.txt").read_text()
    assert "check skipped" in said and "cont skipped" in said and "diag" not in said
    assert "exit" not in said  # no script ran
    env["GPU_AB_SECONDS"] = "600"
    proc = subprocess.run(["bash", str(script), "out2", "cont"], cwd=tmp_path, env=env,  # relative: the caller's
                          capture_output=True, text=True, timeout=60)
    said = (tmp_path / "out2" / "gpu.txt").read_text()
    assert "bench_continuous exit 1" in said and "check" not in said  # PYTHON=false ran, and failed


def test_bench_continuous_runs_where_the_gpu_host_would(tmp_path):
    """benchmarks/bench_continuous.py (gpu_ab.sh's `cont` part) on the tiny preset, with the GPU host's absent
    packages shadowed: both schedules decode every image at its imposed length, continuous in fewer steps."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_continuous.py"), "--preset", "tiny",
                           "--images", "16", "--slots", "8", "--max-tokens", "12", "--rounds", "1"], cwd=tmp_path,
                          env=gpu_host_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    sides = {x["side"]: x for x in lines if "side" in x}
    assert sides["batches"]["tokens"] == sides["continuous"]["tokens"] > 0  # the same imposed lengths
    summary = lines[-1]["summary"]
    assert summary["chunk"] == 1 and summary["fewer_steps"] > 1
    assert round(summary["steps_per_img"]["batches"] * 16) == sides["batches"]["decode_steps"]


def test_bench_retry_pool_runs_where_the_gpu_host_would(tmp_path):
    """benchmarks/bench_retry_pool.py (gpu_ab.sh's `retry` part) on the tiny preset, the GPU host's absent
    packages shadowed: both sides retry the same captions (flagged by key at --flag-rate), the gathered side in
    fewer calls, and the rows come out the same."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_retry_pool.py"), "--preset", "tiny",
                           "--images", "96", "--batch-size", "8", "--gather", "8", "--new-tokens", "4",
                           "--flag-rate", "0.1", "--rounds", "1"], cwd=tmp_path, env=gpu_host_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    sides = {x["side"]: x for x in lines if "side" in x}
    assert sides["each"]["retry_rows"] == 1 and sides["gathered"]["retry_rows"] == 8
    summary = lines[-1]
    each_calls, gathered_calls = summary["retry_calls"]
    assert summary["same_captions"] and summary["retried_captions"][0] == summary["retried_captions"][1] > 0
    assert 0 < gathered_calls < each_calls and summary["gathered_vs_each"] > 0
    assert summary["retry_call_s_1_row"] > 0 and summary["retry_call_s_8_rows"] > 0


def test_bench_prefill_counts_elementwise_bytes_and_times_both_sides(tmp_path):
    """benchmarks/bench_prefill.py on the tiny preset's text layers (real inductor, the GPU host's absent
    packages shadowed): the compiled prefill gives the eager one's output, layer by layer (the product's) and
    whole; and its byte count is exact on ops whose traffic is known (a multiply reads and writes its tensor;
    a GEMM and a view are not counted)."""
    import torch

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_prefill.py"), "--preset", "tiny",
                           "--prompt", "12", "--dtype", "float32", "--rounds", "1", "--whole"], cwd=tmp_path,
                          env=gpu_host_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["eager_elementwise_kb_per_token_layer"] > 0 and result["eager_ms"] > 0 and result["speedup"] > 0
    assert result["max_abs_diff"] < 1e-4 and result["full_model_layers"] == 2
    # --whole: the language model as one graph gives the same output, each side's cold compile timed
    assert result["whole_max_abs_diff"] < 1e-4 and result["whole_ms"] > 0 and result["layers_vs_whole"] > 0
    assert result["compile_s"] > 0 and result["whole_compile_s"] > 0 and result["compiled_second_length_s"] >= 0
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench_prefill import elementwise_bytes
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    x, w = torch.ones(1000), torch.ones(1000, 1000)
    assert elementwise_bytes(lambda: x * 2) == 8000  # 4,000 bytes read, 4,000 written
    assert elementwise_bytes(lambda: (w @ x, x.view(10, 100))) == 0


def test_bench_tower_compile_times_the_tower_whole_and_by_layer(tmp_path):
    """benchmarks/bench_tower_compile.py on the tiny preset (real inductor, the GPU host's absent packages
    shadowed): both compiled sides give the eager tower's output, each side's cold compile timed."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_tower_compile.py"), "--preset", "tiny",
                           "--image-size", "64", "--rounds", "1"], cwd=tmp_path, env=gpu_host_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["encoder_layers"] == 2 and result["whole_compile_s"] > 0 and result["layers_compile_s"] > 0
    assert result["whole_max_abs_diff"] < 1e-4 and result["layers_max_abs_diff"] < 1e-4
    assert result["eager_ms"] > 0 and result["layers_vs_whole_speed"] > 0


def test_bench_vision_chunks_measures_both_sides_peak_in_their_own_processes(tmp_path):
    """benchmarks/bench_vision_chunks.py on the tiny preset (the GPU host's absent packages shadowed): each side
    in a fresh process, the same features, a peak for each and the estimate it is read against."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_vision_chunks.py"), "--preset", "tiny",
                           "--image-size", "64", "--batch", "8", "--chunk-rows", "2", "--rounds", "1"], cwd=tmp_path,
                          env={**gpu_host_env(tmp_path), "TMPDIR": str(temporary)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["features_max_abs_diff"] < 1e-5 and result["whole_ms"] > 0 and result["chunks_ms"] > 0
    assert result["whole_peak_mb"] >= 0 and result["chunks_peak_mb"] >= 0 and result["estimate_mb_per_image"] > 0
    # The children's features went to a temporary folder, now gone (torch may keep its own cache folder there).
    assert not [p.name for p in temporary.iterdir() if p.name.startswith("tmp")]


def test_row_memory_bounds_the_language_model_s_prefill(tmp_path):
    """benchmarks/bench_prefill_memory.py at the 4B's width (one layer, 2 rows of 128 tokens, bf16): what the
    prefill holds a row, eager and compiled layer by layer, is under batch_size.row_memory's estimate, which
    --batch-size auto trusts (and not far under it: the estimate counts the right things)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_prefill_memory.py"), "--layers", "1",
                           "--batch", "2", "--prompt", "128"], cwd=tmp_path, env=gpu_host_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert 0.4 < result["eager_of_estimate"] <= 1.0 and 0 < result["compiled_of_estimate"] <= 1.0, result


@pytest.mark.usefixtures("cpu_fp8_gemm")
def test_bench_fp8_times_every_layer_shape_and_measures_the_logits_drift(tmp_path):
    """benchmarks/bench_fp8.py on the tiny preset (compiled FP8 side, the GPU host's absent packages shadowed):
    each of the preset's linear shapes on both sides at its rows per image, and the first token's logits before
    and after quantize_fp8 (the CPU emulates FP8: its timings say nothing, only that the script runs)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_fp8.py"), "--preset", "tiny", "--batch",
                           "2", "--rounds", "1", "--dtype", "float32", "--compile", "--decode"], cwd=tmp_path,
                          env=gpu_host_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    gemms, logits, fusion = (line for line in lines if "section" in line)
    assert [line["shape"] for line in lines if "shape" in line] == gemms["shapes"]  # each printed as it ended
    assert {(x["part"], x["in"], x["out"]) for x in gemms["shapes"]} >= {("vision_tower", 32, 64),
                                                                         ("language_model", 64, 128), ("decode", 128, 64)}
    assert all(x["bf16_ms"] > 0 and x["fp8_ms"] > 0 and 0 < x["relative_error"] < 0.1 for x in gemms["shapes"])
    # every shape compiled (11 of them: past dynamo's recompile limit of 8 the rest ran eagerly, unsaid)
    assert len(gemms["shapes"]) > 8 and all(x["fp8_graphs"] == 1 for x in gemms["shapes"]), gemms["shapes"]
    assert [x["rows"] for x in gemms["shapes"] if x["part"] == "vision_tower"][0] == 2 * 16  # 64 px / 16 px patches
    assert gemms["compiled_fp8"] and gemms["vision_tower"]["speedup"] > 0
    assert logits["fp8_layers"] > 0 and 0 < logits["logits_relative_error"] < 1 and logits["rows"] == 2
    # the FP8 input's max, scale and cast fuse into the norm's kernel: no kernel more than bf16's
    assert fusion["bf16"] and 0 < len(fusion["fp8"]) <= len(fusion["bf16"]), fusion
