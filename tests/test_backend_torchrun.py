"""The training job on the real engine: torchrun with 2 gloo ranks, and images streamed from the cache.

A small digits project (8 px, grey, 10 classes, some labels wrong, one task without a label)
served by the fake Label Studio; a few epochs only.  What is checked is the plumbing: the
version published by the torchrun path (ALR_TRAIN_PROCESSES=2, the same code as
ALR_GPUS_PER_JOB=2 on a GPU host) has one sane record per task, with the task ids; the
streaming path (ALR_STREAM_ABOVE_TASKS below the project size) gives the same results as the
in-memory path.  The quality of the 2-rank split is tests/test_distributed.py's business.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

from ml_backend.settings import Settings
from ml_backend.store import ProjectStore
from ml_backend.training import TrainingProcessError, run_training_job
from model.datasets import load_digits_dataset
from tests.test_backend_fake_ls import PAT, FakeLabelStudio

N_TASKS = 160
DIGITS_10 = """<View>
  <Image name="image" value="$image"/>
  <Choices name="label" toName="image" choice="single">
    """ + "".join(f'<Choice value="{k}"/>' for k in range(10)) + """
  </Choices>
</View>"""


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array[..., 0]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def digits_ls(backend_env, monkeypatch, tmp_path):
    data = load_digits_dataset()
    rng = np.random.default_rng(0)
    labels = data.labels[:N_TASKS].copy()
    wrong = rng.choice(N_TASKS - 1, size=16, replace=False)
    labels[wrong] = (labels[wrong] + 1 + rng.integers(0, 9, size=16)) % 10
    with FakeLabelStudio() as ls:
        ls.add_project(1, label_config=DIGITS_10)
        for i in range(N_TASKS):
            label = None if i == N_TASKS - 1 else str(int(labels[i]))    # the last task: scored only
            ls.add_task(1, 1000 + i, label=label, pixel=0, image=_png(data.images[i]))
        for var, value in {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": PAT,
                           "ALR_EPOCHS": "3", "ALR_FINETUNE_EPOCHS": "1",
                           "ALR_FORGET_RATE": "0.1", "ALR_BATCH_SIZE": "32", "ALR_DATALOADER_WORKERS": "0",
                           "ALR_JOB_TIMEOUT": "600"}.items():
            monkeypatch.setenv(var, value)
        yield ls


def _published(settings: Settings) -> tuple[dict, dict]:
    store = ProjectStore(settings.model_dir, 1)
    version_dir = store.version_dir(store.current_version())
    results = json.loads((version_dir / "results.json").read_text())
    meta = json.loads((version_dir / "meta.json").read_text())
    return results, meta


def _check_sane(ls, results: dict) -> None:
    items = {int(k): v for k, v in results["items"].items()}
    assert sorted(items) == sorted(ls.tasks)                   # one record per task, by task id
    scores = np.array([v["score"] for v in items.values()])
    assert np.all((scores >= 0) & (scores <= 1))
    for tid, rec in items.items():
        assert rec["suggested"] in [str(k) for k in range(10)]
        if tid != 1000 + N_TASKS - 1:
            assert 0.0 <= rec["prob_label_wrong"] <= 1.0 and rec["loss"] >= 0
    assert items[1000 + N_TASKS - 1]["given"] is None          # unlabelled: scored by a forward pass
    assert {p["task"] for p in ls.predictions} == set(ls.tasks)


def test_torchrun_job_with_two_gloo_ranks_publishes_sane_records(digits_ls, monkeypatch, caplog):
    monkeypatch.setenv("ALR_TRAIN_PROCESSES", "2")
    settings = Settings.from_env()
    with caplog.at_level(logging.INFO, logger="ml_backend.training"):
        summary = run_training_job(1, settings=settings)
    assert summary["status"] == "trained" and summary["phase"] == 1
    results, meta = _published(settings)
    _check_sane(digits_ls, results)
    assert meta["train_processes"] == 2 and meta["n_trained"] == N_TASKS - 1
    assert "world size 2" in caplog.text                      # rank 0's log reached the job log
    version_dir = ProjectStore(settings.model_dir, 1).version_dir(summary["model_version"])
    assert not (version_dir / "torchrun").exists()            # the job's npz copy is not kept

    digits_ls.annotate(1000, "9")                              # a relabel: Phase 2 through torchrun too,
    monkeypatch.setenv("ALR_STREAM_ABOVE_TASKS", "10")          # each rank reading the images decoded once
    summary = run_training_job(1, settings=Settings.from_env())
    assert summary["phase"] == 2 and _published(settings)[1]["phase"] == 2    # as the ranks' scores.npz says
    assert _published(settings)[1]["images_decoded_once"] and _published(settings)[1]["train_processes"] == 2
    results, _ = _published(settings)
    assert results["items"]["1000"]["trusted"] and results["items"]["1000"]["score"] == 1.0


def test_torchrun_failure_fails_the_job_with_its_output(digits_ls, monkeypatch, tmp_path):
    first = run_training_job(1, settings=Settings.from_env())["model_version"]     # in-process
    store = ProjectStore(Settings.from_env().model_dir, 1)
    crashing = tmp_path / "python"          # the job launches torchrun with this interpreter: a rank that dies
    crashing.write_text("#!/bin/sh\necho 'Traceback (most recent call last):'\n"
                        "echo 'RuntimeError: rank 0 lost its GPU' >&2\nexit 3\n")
    crashing.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(crashing))
    digits_ls.annotate(1000, "9")
    monkeypatch.setenv("ALR_TRAIN_PROCESSES", "2")
    with pytest.raises(TrainingProcessError, match="exit code") as err:
        run_training_job(1, settings=Settings.from_env())
    assert "rank 0 lost its GPU" in str(err.value)
    assert store.current_version() == first and len(store.list_versions()) == 1   # nothing half-written


@pytest.mark.timeout(300)
@pytest.mark.parametrize("timeout", [1, 30])
def test_torchrun_and_its_ranks_are_killed_at_the_job_timeout(digits_ls, monkeypatch, caplog, timeout):
    """1 s: torchrun is killed while it starts; 30 s: mid-training, when each rank runs in a session of
    its own (torch's elastic agent starts them so): no rank may outlive the job, and the job must end."""
    monkeypatch.setenv("ALR_TRAIN_PROCESSES", "2")
    monkeypatch.setenv("ALR_JOB_TIMEOUT", str(timeout))
    monkeypatch.setenv("ALR_EPOCHS", "5000")
    settings = Settings.from_env()
    with caplog.at_level("INFO", logger="ml_backend.training"), \
            pytest.raises(TrainingProcessError, match="did not finish within"):
        run_training_job(1, settings=settings)
    if timeout == 30:
        assert re.search(r"torchrun: .*epoch \d+/5000", caplog.text), "the ranks never trained: nothing was tested"
    assert ProjectStore(settings.model_dir, 1).current_version() is None
    left = _processes_with(settings.model_dir)
    assert not left, f"processes of the job outlived it: {[_cmdline(pid) for pid in left]}"


@pytest.mark.timeout(300)
def test_a_job_killed_with_sigkill_leaves_no_rank_training(digits_ls, monkeypatch, tmp_path):
    """The job's process killed with SIGKILL mid-training (a worker killed, the OOM killer) runs no
    cleanup, and the ranks run in sessions of their own: they must end anyway.  Here two things end
    them: --exit-with-pid (within 2 s), and rank 0's next write to the dead job's pipe (SIGPIPE),
    which on these tiny epochs comes at once; on a project whose epochs take minutes only the first
    is quick, and the next test checks it alone."""
    import signal
    import subprocess
    import time

    from tests.conftest import REPO

    monkeypatch.setenv("ALR_TRAIN_PROCESSES", "2")
    monkeypatch.setenv("ALR_EPOCHS", "5000")
    settings = Settings.from_env()
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        job = subprocess.Popen([sys.executable, "-c", "import logging; logging.basicConfig(level='INFO'); "
                                "from ml_backend.training import run_training_job; run_training_job(1)"],
                               cwd=REPO, env=dict(os.environ), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not re.search(r"torchrun: .*epoch \d+/5000", log.read_text()):
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert _processes_with("model.train", settings.model_dir), "no rank of the job was found: nothing was tested"
        job.send_signal(signal.SIGKILL)
        job.wait(10)
        deadline = time.monotonic() + 30
        while _processes_with(settings.model_dir):
            assert time.monotonic() < deadline, "the ranks outlived the job by 30 s"
            time.sleep(0.5)
    finally:
        if job.poll() is None:
            job.kill()


def test_exit_with_pid_ends_the_process_when_the_other_ends():
    """model.train's --exit-with-pid on its own: a process that writes nothing ends within seconds of
    the process it watches."""
    import subprocess
    import time

    from tests.conftest import REPO

    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    watcher = subprocess.Popen([sys.executable, "-c", f"import time, model.processes as t; t.exit_with({watched.pid}, "
                                "period=0.2); print('watching', flush=True); time.sleep(120)"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline() == "watching\n"   # imports done, the thread watches
        time.sleep(1.0)
        assert watcher.poll() is None                    # the watched process lives: so does the watcher
        t0 = time.monotonic()
        watched.kill()
        watched.wait(10)
        assert watcher.wait(10) == 1 and time.monotonic() - t0 < 5
        assert f"process {watched.pid}, which started this one, has ended" in watcher.stderr.read()
    finally:
        for proc in (watched, watcher):
            if proc.poll() is None:
                proc.kill()


def _processes_with(*parts: str) -> list[str]:
    """The pids whose command line holds every one of ``parts``."""
    return [pid for pid in os.listdir("/proc") if pid.isdigit() and all(part in _cmdline(pid) for part in parts)]


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_streamed_images_give_the_same_results_as_in_memory(digits_ls, monkeypatch, tmp_path):
    runs = {}
    for name, threshold in (("memory", "100000"), ("stream", "10")):
        monkeypatch.setenv("MODEL_DIR", str(tmp_path / name))
        monkeypatch.setenv("ALR_STREAM_ABOVE_TASKS", threshold)
        settings = Settings.from_env()
        run_training_job(1, settings=settings)
        runs[name] = _published(settings)
    assert not runs["memory"][1]["streamed_images"] and runs["stream"][1]["streamed_images"]
    assert runs["stream"][1]["images_decoded_once"]                    # into one file, read back by each epoch ...
    assert not (tmp_path / "stream" / "project-1" / ".tmp-decoded").exists()    # ... that the job removed
    memory, stream = runs["memory"][0]["items"], runs["stream"][0]["items"]
    assert memory.keys() == stream.keys()
    # Same seed, same training: the DataLoader that streams the files has a generator of its own
    # (model/sources.py), so it does not shift the dropout and augmentation draws.
    agree = np.mean([memory[t]["suggested"] == stream[t]["suggested"] for t in memory])
    diff = max(abs(memory[t]["score"] - stream[t]["score"]) for t in memory)
    assert agree == 1.0 and diff < 1e-6, f"suggestions agree on {agree:.3f}, largest score difference {diff:.2g}"

    from model.engine import FileImages, score_images
    settings = Settings.from_env()
    store = ProjectStore(str(tmp_path / "memory"), 1)
    checkpoint = store.version_dir(store.current_version()) / "checkpoint.pt"
    paths = sorted(p for p in (tmp_path / "stream" / "image_cache").rglob("*") if p.is_file())
    files = FileImages(paths, image_size=settings.image_size, channels=settings.channels)
    arrays = np.stack([files[i].permute(1, 2, 0).numpy() for i in range(len(files))])
    from_files, from_memory = score_images(checkpoint, files), score_images(checkpoint, arrays)
    np.testing.assert_allclose(from_files.pred_probs, from_memory.pred_probs, atol=1e-6)
    np.testing.assert_allclose(from_files.ls_score, from_memory.ls_score, atol=1e-6)
