"""Choices that depend on the machine: precision by measurement, threads shared between workers, and the
training-time changes that save memory (passes of fewer rows, frozen weights stored in bf16) train the same."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import make_job

from conftest import sentiment_rows, tiny_params
from lorapipe import host
from lorapipe.config import parse_params
from lorapipe.host import CoreShare, choose_precision, memory
from lorapipe.host import threads as host_threads
from lorapipe.models.loading import load_tokenizer
from lorapipe.training import build, probe
from lorapipe.training import recipe as training


@pytest.fixture()
def params(tmp_path):
    return parse_params(tiny_params(tmp_path, tmp_path, tmp_path))


def fake_timer(rates: dict[str, float]):
    """A ``step_timer`` that reports ``rates`` instead of timing, and runs no step."""
    return lambda step, rows, **options: lambda precision: rates[precision]


def test_choose_precision_takes_the_faster_and_logs_both(caplog):
    for rates, expected in (({"fp32": 5.3, "bf16": 2.9}, "fp32"), ({"fp32": 2.1, "bf16": 3.4}, "bf16")):
        with caplog.at_level("INFO"):
            choice = choose_precision(rates.__getitem__)
        assert choice.precision == expected and choice.rates == rates and choice.measured
        assert f"fp32 {rates['fp32']:.2f}, bf16 {rates['bf16']:.2f}" in caplog.records[-1].message


def test_a_close_call_is_timed_again_and_each_precision_keeps_its_better_rate(caplog):
    """The train stage's case on an Intel Xeon: fp32's first timing was slow, bf16 led by 1.12x and won."""
    timings = {"fp32": [2.51, 4.62], "bf16": [2.82, 3.27]}
    calls = []

    def measure(precision: str) -> float:
        calls.append(precision)
        return timings[precision][calls.count(precision) - 1]

    with caplog.at_level("INFO"):
        choice = choose_precision(measure)
    assert calls == ["fp32", "bf16", "fp32", "bf16"]  # alternating, not one precision twice in a row
    assert choice.precision == "fp32" and choice.rates == {"fp32": 4.62, "bf16": 3.27}
    assert "best of 2" in caplog.records[-1].message

    timings = {"fp32": [2.0], "bf16": [4.1]}  # a lead of 2x or more is not timed again
    calls.clear()
    assert choose_precision(measure).precision == "bf16" and calls == ["fp32", "bf16"]


def test_step_timer_warms_up_once_and_reports_examples_per_second():
    calls = []
    step = lambda precision: calls.append(precision) or time.sleep(0.01)  # noqa: E731
    measure = host.step_timer(step, rows=4, repeats=2, warm_up=lambda precision: calls.append("warm " + precision))
    rate = measure("fp32")
    assert calls == ["warm fp32", "fp32", "fp32"]  # one untimed warm-up, two timed
    assert 4 / 0.05 < rate < 4 / 0.009
    measure("fp32")
    assert calls.count("warm fp32") == 1 and calls.count("fp32") == 4


def test_step_timer_stops_a_precision_whose_warm_up_is_slower_than_a_full_step(caplog):
    seconds = {"fp32": 0.02, "bf16": 0.05}
    calls = []

    def run(what: str, precision: str) -> None:
        calls.append(what + precision)
        time.sleep(seconds[precision])

    measure = host.step_timer(
        lambda precision: run("", precision), rows=16, warm_up=lambda precision: run("warm ", precision), warm_up_rows=2
    )
    with caplog.at_level("INFO"):
        choice = choose_precision(measure)
    assert calls == ["warm fp32", "fp32", "warm bf16"]  # bf16's full step never ran
    assert choice.precision == "fp32" and choice.rates["bf16"] <= round(2 / 0.05, 2)
    assert "bf16's 2-row warm-up took" in caplog.text and "not timed further" in caplog.text
    assert round(measure("bf16"), 2) == choice.rates["bf16"] and len(calls) == 3  # measured again: not run

    seconds["bf16"] = 0.001  # a warm-up faster than fp32's full step: timed in full, and wins
    calls.clear()
    choice = choose_precision(host.step_timer(
        lambda precision: run("", precision), rows=16, warm_up=lambda precision: run("warm ", precision), warm_up_rows=2
    ))  # fmt: skip
    assert calls == ["warm fp32", "fp32", "warm bf16", "bf16"] and choice.precision == "bf16"


@pytest.mark.parametrize("rates,expected", [({"fp32": 9.0, "bf16": 4.0}, "fp32"), ({"fp32": 4.0, "bf16": 9.0}, "bf16")])
def test_auto_trains_in_the_measured_faster_precision(tmp_path, tiny_model, params, monkeypatch, rates, expected):
    monkeypatch.setattr(probe, "step_timer", fake_timer(rates))
    train = params.train.model_copy(update={"max_steps": 2, "cpu_precision": "auto"})
    summary = training.train_adapter(make_job(tmp_path, tiny_model, params, live=False), params.lora, train)
    assert summary["precision"] == expected and summary["precision_rates"] == rates and summary["precision_measured"]
    card = (tmp_path / "adapters" / "sentiment" / "README.md").read_text()
    assert f"Precision {expected}, chosen by timing this CPU" in card and "fp32 " in card and "bf16 " in card


@pytest.mark.parametrize("pinned", ["fp32", "bf16"])
def test_a_pinned_precision_is_never_measured_or_overridden(tmp_path, tiny_model, params, monkeypatch, pinned):
    def refuse(step, rows, **options):
        raise AssertionError("a pinned precision was measured")

    monkeypatch.setattr(probe, "step_timer", refuse)
    train = params.train.model_copy(update={"max_steps": 2, "cpu_precision": pinned})
    summary = training.train_adapter(make_job(tmp_path, tiny_model, params, live=False), params.lora, train)
    assert summary["precision"] == pinned and summary["precision_rates"] is None
    assert not summary["precision_measured"]


def adapter_after(tmp_path: Path, tiny_model, params, name: str, **train_update) -> dict[str, torch.Tensor]:
    job = make_job(tmp_path / name, tiny_model, params, live=False)
    train = params.train.model_copy(update={"max_steps": 3, **train_update})
    training.train_adapter(job, params.lora, train)
    return load_file(job.adapter_out / "adapter_model.safetensors")


def test_the_probe_leaves_training_exactly_as_the_pinned_choice(tmp_path, tiny_model, params, monkeypatch):
    """The probe adds and removes LoRA layers and restores the random state: the adapter is bit-identical."""
    pinned = adapter_after(tmp_path, tiny_model, params, "pinned", cpu_precision="fp32")
    real_timer = probe.step_timer

    def fp32_wins(step, rows, **options):  # the real steps run and are timed; fp32 is made to win
        measure = real_timer(step, rows, **options)
        return lambda precision: measure(precision) * (precision == "fp32")

    monkeypatch.setattr(probe, "step_timer", fp32_wins)
    probed = adapter_after(tmp_path, tiny_model, params, "auto", cpu_precision="auto")
    assert pinned.keys() == probed.keys()
    assert all(torch.equal(pinned[k], probed[k]) for k in pinned)


def test_a_probe_of_the_first_layers_leaves_training_exactly_as_the_pinned_choice(
    tmp_path, tiny_model, params, monkeypatch
):
    """The stage's probe runs a few of the model's layers; the tiny model has two, so here it runs one."""
    pinned = adapter_after(tmp_path, tiny_model, params, "pinned", cpu_precision="fp32")
    monkeypatch.setattr(probe, "PROBE_LAYERS", 1)
    monkeypatch.setattr(probe, "step_timer", fake_timer({"fp32": 9.0, "bf16": 4.0}))
    probed = adapter_after(tmp_path, tiny_model, params, "auto", cpu_precision="auto")
    assert all(torch.equal(pinned[k], probed[k]) for k in pinned)
    summary = (tmp_path / "auto" / "metrics" / "train_sentiment.json").read_text()
    assert '"precision_probe": "forward + backward of 1 of 2 layers"' in summary


def test_the_probe_runs_only_the_first_layers_and_hands_all_of_them_back(tiny_model, params, monkeypatch):
    from lorapipe.models.loading import load_for_inference

    model = load_for_inference(tiny_model)
    layers = list(model.get_decoder().layers)
    ran: list[int] = []
    for index, layer in enumerate(layers):
        layer.register_forward_hook(lambda module, args, output, index=index: ran.append(index))
    rows = sentiment_rows(params.prompt, 8)
    choice = probe.measure_precision(model, load_tokenizer(tiny_model), rows, params.lora, params.train, layers=1)
    assert ran and set(ran) == {0}  # the shared prefix and the suffixes, warm-ups and timed steps: layer 0 only
    assert choice.probe == "forward + backward of 1 of 2 layers" and set(choice.rates) == {"fp32", "bf16"}
    assert list(model.get_decoder().layers) == layers
    ran.clear()
    probe.measure_precision(model, load_tokenizer(tiny_model), rows, params.lora, params.train, layers=5)
    assert set(ran) == {0, 1}  # more than the model has: all of them


def test_frozen_weights_stored_in_bf16_train_bit_identically(tmp_path, tiny_model, params, monkeypatch):
    stored = adapter_after(tmp_path, tiny_model, params, "stored", cpu_precision="bf16")
    monkeypatch.setattr(build, "store_frozen_linears_in_bf16", lambda model: 0)
    cast = adapter_after(tmp_path, tiny_model, params, "cast", cpu_precision="bf16")
    assert all(torch.equal(stored[k], cast[k]) for k in stored)


def test_the_probe_times_bf16_on_bf16_weights_and_hands_back_the_fp32_ones(tiny_model, params, monkeypatch):
    from lorapipe.models.loading import load_for_inference

    model = load_for_inference(tiny_model)
    before = {name: (p, p.data.clone()) for name, p in model.named_parameters()}
    seen: dict[str, set] = {}

    def timer(step, rows, **options):
        def measure(precision):
            seen[precision] = {m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Linear)}
            return 1.0

        return measure

    monkeypatch.setattr(probe, "step_timer", timer)
    rows = sentiment_rows(params.prompt, 8)
    probe.measure_precision(model, load_tokenizer(tiny_model), rows, params.lora, params.train)
    assert seen["fp32"] == {torch.float32}
    assert torch.bfloat16 in seen["bf16"]  # the frozen projections; the tied output head stays fp32
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, (param, data) in before.items():
        assert after[name] is param and param.dtype == torch.float32 and torch.equal(param.data, data), name


def test_passes_of_fewer_rows_train_the_same_adapter(tmp_path, tiny_model, params):
    lora = params.lora.model_copy(update={"dropout": 0.0})
    params = params.model_copy(update={"lora": lora})
    whole = adapter_after(
        tmp_path, tiny_model, params, "whole", cpu_precision="fp32", pass_tokens=None, fp32_pass_tokens=None
    )
    split = adapter_after(
        tmp_path, tiny_model, params, "split", cpu_precision="fp32", pass_tokens=24, fp32_pass_tokens=None
    )
    summary = (tmp_path / "split" / "metrics" / "train_sentiment.json").read_text()
    assert '"split_batches": 3' in summary
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-4, atol=1e-6)


WORKER = """
import sys, time
from pathlib import Path
from lorapipe.host import CoreShare
share = CoreShare(Path(sys.argv[1]))
print("ready", flush=True)
time.sleep(60)
"""


def test_workers_share_the_cores_and_a_finished_one_gives_them_back(tmp_path, monkeypatch):
    monkeypatch.delenv(host.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(host_threads, "host_cores", lambda: 4)
    threads = torch.get_num_threads()
    share = CoreShare(tmp_path)
    try:
        assert share.refresh() == 4 and share.workers() == 1
        other = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert other.stdout.readline().strip() == "ready"
        assert share.workers() == 2 and share.refresh() == 2 and torch.get_num_threads() == 2
        other.kill()
        other.wait()
        assert share.refresh() == 4 and len(list(tmp_path.iterdir())) == 1  # the dead worker's file is removed
        monkeypatch.setenv(host.THREADS_ENV, "3")
        assert share.refresh() == 3
    finally:
        share.close()
        torch.set_num_threads(threads)


REVISIT_FIRST_SHAPE = """
import os, sys
from lorapipe.host import bound_onednn_cache
if sys.argv[1] == "user":
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "1024"
bound_onednn_cache()
os.environ["ONEDNN_VERBOSE"] = "profile_create"  # oneDNN logs each primitive's creation: a cache hit or miss
import torch
weight = torch.randn(64, 32)
for rows in [*range(10, 60), 10]:  # 50 shapes, then the first again (1-row products bypass oneDNN)
    print(f"rows {rows}", flush=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.functional.linear(torch.randn(rows, 32), weight)
"""


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("setting", ["ours", "user"])
def test_the_onednn_cache_holds_at_most_32_primitives_unless_the_user_set_it(setting):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ONEDNN_", "DNNL_"))}
    done = subprocess.run(
        [sys.executable, "-c", REVISIT_FIRST_SHAPE, setting], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    revisit = lines[lines.index("rows 10", 1) + 1 :]  # what oneDNN said when the first shape came back
    created = [line for line in revisit if "primitive,create:" in line]
    assert len(created) == 1, revisit
    # Bounded to 32, the first shape's primitive was evicted by the 49 after it; the user's 1024 kept it.
    assert ("create:cache_miss" if setting == "ours" else "create:cache_hit") in created[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_free_memory_goes_back_to_the_system_after_a_large_free():
    from lorapipe.host import free_held_bytes, release_free_memory

    def resident_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    blocks = [bytearray(64 * 1024) for _ in range(4096)]  # 256 MiB in pieces below glibc's mmap threshold
    keep = blocks[-1]  # the top of the heap stays in use: only trimming inside the heap can release the rest
    del blocks
    before = resident_mib()
    held = free_held_bytes()
    if held is not None:  # glibc 2.33 or later: it says what it holds, and less than the threshold is kept
        assert held > 200 * 2**20
        release_free_memory(above=held + 2**30)
        assert resident_mib() > before - 16
        release_free_memory(above=held // 2)
    else:
        release_free_memory()
    assert resident_mib() < before - 128
    assert keep


@pytest.mark.parametrize("precision,budget,splits", [("fp32", 24, 3), ("bf16", None, 0)])
def test_fp32_training_runs_passes_of_its_own_budget(tmp_path, tiny_model, params, precision, budget, splits):
    """fp32's activations take more memory: fp32_pass_tokens caps its passes; bf16 keeps pass_tokens (none)."""
    job = make_job(tmp_path, tiny_model, params, live=False)
    train = params.train.model_copy(
        update={"max_steps": 3, "cpu_precision": precision, "pass_tokens": None, "fp32_pass_tokens": 24}
    )
    summary = training.train_adapter(job, params.lora, train)
    assert summary["precision"] == precision
    assert summary["pass_tokens"] == budget and summary["split_batches"] == splits


@pytest.mark.skipif(not memory.PROC_CLEAR_REFS.exists(), reason="the peak can be reset on Linux only")
def test_the_peak_memory_can_start_afresh_for_each_model():
    """One eval process scores several models; each model's peak_rss_mib must not include the one before."""
    assert memory.reset_peak_rss()  # the peak from here, not the earlier tests' in this process
    before = memory.peak_rss_mib()
    block = torch.ones(64 * 2**20)  # 256 MiB, every page touched
    held = memory.peak_rss_mib()
    del block
    memory.release_free_memory()
    assert held >= before + 200 and memory.peak_rss_mib() > held - 10  # the peak stays after the memory is freed
    assert memory.reset_peak_rss()
    assert memory.peak_rss_mib() < held - 200


FAULTS_SCRIPT = """
import resource, sys, torch
from lorapipe.host import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step(k):  # a training step's pattern: a dozen tensors of 1-13 MiB, other sizes each step, all freed
    held = [torch.ones((1 + (k * 7 + i) % 13) * 2**18) for i in range(12)]
    return sum(float(t[0]) for t in held)
step(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for k in range(1, 20):
    step(k)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_freed_memory_spares_the_next_steps_page_faults():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}

    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return int(run.stdout)

    kept, default = faults("keep"), faults("default")
    assert kept < default / 2, (kept, default)  # measured: about 9,000 against 53,000


def test_a_users_allocator_settings_are_left_alone(monkeypatch):
    calls = []

    def mallopt(parameter: int, value: int) -> int:
        calls.append((parameter, value))
        return 1

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for key in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    assert memory.keep_freed_memory(mallopt)
    assert calls == [(memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD), (memory.M_TRIM_THRESHOLD, memory.TRIM_THRESHOLD)]
    calls.clear()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert not memory.keep_freed_memory(mallopt) and calls == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator controls")
def test_a_c_library_without_mallinfo2_trims_every_batch_and_says_so_once(monkeypatch, caplog):
    import ctypes

    real, trims = ctypes.CDLL, []

    class OldGlibc:  # glibc before 2.33: no mallinfo2 to tell how much is held free
        def __init__(self, name):
            self.library = real(name)

        def __getattr__(self, function):
            if function == "mallinfo2":
                raise AttributeError(function)
            if function == "malloc_trim":
                return lambda pad: trims.append(pad) or 1
            return getattr(self.library, function)

    monkeypatch.setattr(ctypes, "CDLL", OldGlibc)
    memory._glibc.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert memory.free_held_bytes() is None
            memory.release_free_memory(above=2**40)  # nothing tells what is held: handed back anyway
            memory.release_free_memory(above=2**40)
    finally:
        memory._glibc.cache_clear()
    assert trims == [0, 0]
    said = [r.getMessage() for r in caplog.records if "mallinfo2" in r.getMessage()]
    assert said == ["fallback: the C library has no mallinfo2: glibc older than 2.33; freed memory is handed back "
                    "after every evaluation batch"]  # fmt: skip


BUSY_LOOP = "while True: pass"


def free_cores_settled(share: CoreShare, expected: int, tries: int = 6) -> int:
    """The free cores, looked at again (up to ``tries`` times) while the machine's other work settles."""
    for _ in range(tries):
        found = share.free_cores()
        if found == expected:
            break
    return found


def test_the_threads_a_stage_picks_drop_while_a_busy_neighbour_runs_and_come_back_after(tmp_path, monkeypatch):
    """A single-threaded busy loop in a session of its own (another terminal, niced: Linux's autogroups still give
    it a fair share) takes a core from the count; when it ends the core comes back."""
    monkeypatch.delenv(host.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = host_threads.host_cores()
    threads = torch.get_num_threads()
    share = CoreShare(tmp_path)
    try:
        assert free_cores_settled(share, cores) == cores
        neighbour = subprocess.Popen(
            [sys.executable, "-c", BUSY_LOOP], start_new_session=True, preexec_fn=lambda: os.nice(19)
        )
        try:
            time.sleep(0.2)
            assert free_cores_settled(share, max(1, cores - 1)) == max(1, cores - 1)
            assert share.refresh() == max(1, cores - 1) == torch.get_num_threads()
        finally:
            neighbour.kill()
            neighbour.wait()
        assert free_cores_settled(share, cores) == cores and share.refresh() == cores
    finally:
        share.close()
        torch.set_num_threads(threads)


def test_other_work_starting_mid_run_is_logged_and_changes_neither_the_threads_nor_the_adapter(
    tmp_path, tiny_model, params, monkeypatch, caplog
):
    """The count is chosen once when the stage starts: work that starts mid-run (here, as the stage sees it: two
    cores busy elsewhere from the first step on) leaves the threads, and so the arithmetic, as they were."""
    monkeypatch.delenv(host.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(host_threads, "WATCH_SECONDS", 0.0)
    threads = torch.get_num_threads()
    try:
        quiet = adapter_after(tmp_path, tiny_model, params, "quiet", cpu_precision="fp32")
        seen: list[int] = []
        real_watch = host_threads.CoreShare.watch

        def busy_from_now_on(share):
            seen.append(torch.get_num_threads())  # first: the count chosen at the start
            monkeypatch.setattr(host_threads, "busy_elsewhere", lambda since: 2.0)
            real_watch(share)
            seen.append(torch.get_num_threads())

        monkeypatch.setattr(host_threads.CoreShare, "watch", busy_from_now_on)
        with caplog.at_level("INFO", logger="lorapipe.host.threads"):
            busy = adapter_after(tmp_path, tiny_model, params, "busy", cpu_precision="fp32")
        chosen = seen[0]
        assert len(seen) > 2 and set(seen) == {chosen}
        assert "other work now keeps 2 of" in caplog.text and f"keeps its {chosen} threads" in caplog.text
        summary = (tmp_path / "busy" / "metrics" / "train_sentiment.json").read_text()
        assert f'"threads": {chosen}' in summary
        assert all(torch.equal(quiet[k], busy[k]) for k in quiet)
    finally:
        torch.set_num_threads(threads)
