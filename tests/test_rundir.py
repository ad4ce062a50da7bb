"""Run folders: ownership read from the record's content (a forged or foreign marker claims nothing),
--overwrite removing only what the record lists, symlinked outputs judged by their target, one writer
per folder (two processes), stale locks, and temp folders of killed builders swept."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from posttrain.errors import PosttrainError
from posttrain.rundir import LOCK, RECORD, Record, RunDir, atomic_folder, inspect, make_temp_folder, owned_entry, read_record, sweep_temp_folders


def _owned(folder, command="sft", created=("metrics.jsonl",)):
    """A folder a posttrain run made: its record and the entries it lists."""
    run = RunDir.open(folder, command)
    for name in created:
        run.entry(name).write_text("posttrain's")
    run.release()
    return run


@pytest.mark.parametrize("forge", [
    lambda f: f.touch(),                                             # a name alone
    lambda f: f.mkdir(),                                             # a folder of that name
    lambda f: f.write_text("{}"),                                    # JSON, but not a record
    lambda f: f.write_text("not json at all"),
    lambda f: f.write_bytes(b"\xff\xfe\x00"),
    lambda f: f.write_text(json.dumps({**Record("sft").to_json(), "kind": "something else"})),
    lambda f: f.write_text(json.dumps({**Record("sft").to_json(), "run_id": "1234"})),
    lambda f: f.write_text(json.dumps({**Record("sft").to_json(), "format": 99})),
    lambda f: f.write_text(json.dumps({**Record("sft").to_json(), "created": ["../thesis.tex"]})),
    lambda f: f.write_text(json.dumps({**Record("sft").to_json(), "created": "thesis.tex"})),
    lambda f: f.symlink_to(f.parent.parent / "real_record.json"),    # a link to a valid record elsewhere
])
def test_a_forged_marker_claims_nothing(tmp_path, forge):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    (tmp_path / "real_record.json").write_text(json.dumps(Record("sft", created=["thesis.tex"]).to_json()))
    forge(user / RECORD)
    assert read_record(user) is None and inspect(user).state == "foreign"
    for flags in ({}, {"overwrite": True}, {"resume": True}, {"rerun": True}):
        with pytest.raises(PosttrainError, match="holds files posttrain did not write"):
            RunDir.open(user, "sft", **flags)
    assert (user / "thesis.tex").read_text() == "years of work"


def test_the_old_markers_are_only_names(tmp_path):
    """What 0.1 took for proof of ownership: a config file's name, or an empty file pretrain.json."""
    for name in ("sft_config.json", "rl_config.json", "pretrain.json", "run_state.json"):
        user = tmp_path / name.split(".")[0]
        user.mkdir()
        (user / "thesis.tex").write_text("work")
        (user / name).write_text("{}")
        with pytest.raises(PosttrainError, match="did not write"):
            RunDir.open(user, "sft", overwrite=True)
        assert (user / "thesis.tex").exists()


def test_claiming_rules(tmp_path):
    assert RunDir(tmp_path / "new", "sft").check() == "new"
    (tmp_path / "empty").mkdir()
    assert RunDir(tmp_path / "empty", "sft").check() == "new"
    run = _owned(tmp_path / "run")
    assert read_record(tmp_path / "run").run_id == run.record.run_id
    with pytest.raises(PosttrainError, match="already holds a run; pass --resume"):
        RunDir(tmp_path / "run", "sft").check()
    assert RunDir(tmp_path / "run", "sft").check(resume=True) == "resume"
    assert RunDir(tmp_path / "run", "sft").check(rerun=True) == "rerun"
    with pytest.raises(PosttrainError, match="holds a posttrain sft run; posttrain rl writes only into a new folder or its own"):
        RunDir(tmp_path / "run", "rl").check(resume=True)
    with pytest.raises(PosttrainError, match="is a file"):
        (tmp_path / "file").write_text("x")
        RunDir(tmp_path / "file", "sft").check()


def test_overwrite_removes_only_what_the_record_lists(tmp_path, capsys):
    out = tmp_path / "run"
    first = _owned(out, created=("metrics.jsonl", "checkpoints"))
    (out / "checkpoints").unlink()
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-1").mkdir()
    (out / "notes.txt").write_text("the user's, added later")
    run = RunDir.open(out, "sft", overwrite=True)
    assert sorted(os.listdir(out)) == sorted([LOCK, RECORD, "notes.txt"])
    assert (out / "notes.txt").read_text() == "the user's, added later"
    assert "kept what posttrain did not write" in capsys.readouterr().out
    assert run.record.run_id != first.record.run_id and run.record.created == []
    with pytest.raises(PosttrainError, match="notes.txt was not written by posttrain"):
        run.own("notes.txt")  # the new run never writes over it either
    run.release()
    with pytest.raises(PosttrainError, match="notes.txt was not written by posttrain"):
        RunDir(out, "sft").check(resume=True, expect=["notes.txt"])  # refused before any work


def test_a_symlinked_output_is_judged_by_its_target(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "README.md").write_text("mine")
    (tmp_path / "link").symlink_to(user)
    for flags in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(PosttrainError, match="did not write"):
            RunDir.open(tmp_path / "link", "sft", **flags)
    assert sorted(os.listdir(user)) == ["README.md"]
    _owned(tmp_path / "real")
    (tmp_path / "to_run").symlink_to(tmp_path / "real")
    run = RunDir.open(tmp_path / "to_run", "sft", resume=True)
    run.own("run_state.json")
    run.release()
    assert "run_state.json" in read_record(tmp_path / "real").created
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(PosttrainError, match="which does not exist"):
        RunDir(tmp_path / "dangling", "sft").check()


def test_a_link_inside_a_run_is_never_followed_by_overwrite(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    _owned(out, created=("checkpoints",))
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("x")
    (out / "checkpoints").unlink()
    (out / "checkpoints").symlink_to(elsewhere)
    with pytest.raises(PosttrainError, match="symbolic link"):
        RunDir.open(out, "sft", overwrite=True)
    assert (elsewhere / "keep").exists()


def test_owned_entry_needs_the_record_and_the_entry(tmp_path):
    _owned(tmp_path / "ev", "eval", created=("summary.json",))
    assert owned_entry(tmp_path / "ev", "summary.json", "eval")
    assert not owned_entry(tmp_path / "ev", "summary.json", "sft")
    assert not owned_entry(tmp_path / "ev", "records.jsonl")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "summary.json").write_text('{"accuracy": 0.99}')
    assert not owned_entry(tmp_path / "user", "summary.json")


HOLD = textwrap.dedent("""
    import sys, time
    from posttrain.rundir import RunDir
    run = RunDir.open(sys.argv[1], "sft")
    print("locked", flush=True)
    time.sleep(120)
""")


def _holder(folder):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_one_writer_per_folder_and_a_killed_writers_lock_blocks_nobody(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with pytest.raises(PosttrainError, match=f"another posttrain process \\(pid {proc.pid}\\) is writing to"):
            RunDir.open(out, "sft", resume=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / LOCK).exists()  # the lock file stays; the lock went with the process
    run = RunDir.open(out, "sft", resume=True)
    assert run.plan == "resume"
    run.release()


def test_two_processes_racing_for_an_empty_folder_get_one_writer(tmp_path):
    race = textwrap.dedent("""
        import sys, time
        from posttrain.errors import PosttrainError
        from posttrain.rundir import RunDir
        while time.time() < float(sys.argv[2]):
            pass
        try:
            run = RunDir.open(sys.argv[1], "sft")
            print("won", run.record.run_id, flush=True)
            time.sleep(3)
        except PosttrainError as e:
            print("lost", e, flush=True)
    """)
    import time

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    start = str(time.time() + 2)
    procs = [subprocess.Popen([sys.executable, "-c", race, str(tmp_path / "run"), start], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    said = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert said[0].startswith("lost") and said[1].startswith("won"), said
    assert "is writing to" in said[0] or "already holds a run" in said[0]
    assert read_record(tmp_path / "run").run_id == said[1].split()[1]


def test_atomic_folder_replaces_only_its_own_whole_output(tmp_path):
    out = tmp_path / "model"
    with atomic_folder(out, "pretrain") as tmp:
        (tmp / "config.json").write_text("{}")
    assert read_record(out).created == ["config.json"] and read_record(out).command == "pretrain"
    with pytest.raises(PosttrainError, match="holds a posttrain pretrain output"):
        with atomic_folder(out, "pretrain") as tmp:
            pass
    with atomic_folder(out, "pretrain", replace=True) as tmp:
        (tmp / "weights").write_text("new")
    assert sorted(os.listdir(out)) == [RECORD, "weights"]
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(PosttrainError, match="holds files posttrain did not write \\(thesis.tex\\)"):
        with atomic_folder(out, "pretrain", replace=True) as tmp:
            pass
    assert (out / "thesis.tex").exists()
    user = tmp_path / "user"
    user.mkdir()
    (user / "pretrain.json").write_text("{}")  # once enough for pretrain to replace the folder
    with pytest.raises(PosttrainError, match="posttrain did not write it"):
        with atomic_folder(user, "pretrain", replace=True):
            pass
    assert not [p for p in tmp_path.iterdir() if ".posttrain-tmp-" in p.name]


def test_temp_folders_of_dead_builders_are_swept_and_live_ones_kept(tmp_path):
    code = "import sys, os; from posttrain.rundir import make_temp_folder; print(make_temp_folder(sys.argv[1], 'merged'), flush=True); os.kill(os.getpid(), 9)"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env)
    dead = tmp_path / r.stdout.strip().rsplit("/", 1)[-1]
    assert dead.is_dir() and r.returncode == -signal.SIGKILL
    (dead / "model.safetensors").write_bytes(b"half")
    live = make_temp_folder(tmp_path, "merged")  # this process: alive
    lookalike = tmp_path / ".merged.posttrain-tmp-1-abc"  # the name alone, no stamp: not ours to remove
    lookalike.mkdir()
    other = make_temp_folder(tmp_path, "other")
    assert sweep_temp_folders(tmp_path, "merged", say=lambda *_: None) == [dead]
    assert live.exists() and lookalike.exists() and other.exists() and not dead.exists()


def test_a_failed_new_run_leaves_nothing_and_a_kept_one_stays(tmp_path):
    from posttrain.rundir import discard_provisional

    failed = RunDir.open(tmp_path / "a", "rl")
    failed.entry("rl_config.json").write_text("{}")
    kept = RunDir.open(tmp_path / "b", "rl")
    kept.entry("metrics.jsonl").write_text("{}")
    kept.keep()
    (tmp_path / "empty").mkdir()
    in_empty = RunDir.open(tmp_path / "empty", "rl")
    in_empty.entry("rl_config.json").write_text("{}")
    _owned(tmp_path / "old", "rl", created=("metrics.jsonl",))
    resumed = RunDir.open(tmp_path / "old", "rl", resume=True)  # a resumed run is never discarded
    discard_provisional()
    assert not (tmp_path / "a").exists() and os.listdir(tmp_path / "empty") == []
    assert (tmp_path / "b" / "metrics.jsonl").exists() and (tmp_path / "old" / "metrics.jsonl").exists()
    assert RunDir(tmp_path / "a", "rl").check() == "new"  # the corrected rerun is not blocked
    resumed.release()
    kept.release()


def test_the_final_model_is_staged_in_a_recorded_folder_and_nothing_else(tmp_path, tiny_tokenizer):
    """save_final_model writes into ``model.tmp-final`` (recorded before it is made), clears one a killed
    save left, moves every file to the top of the run folder, and leaves no other (hidden) folder."""
    from conftest import make_tiny_model
    from posttrain.trainers.checkpoints import save_final_model
    from posttrain.trainers.run import make_accelerator

    out = tmp_path / "run"
    (out / "model.tmp-final").mkdir(parents=True)
    (out / "model.tmp-final" / "half-written.bin").write_bytes(b"x")  # a killed save's leftover
    owned = []
    save_final_model(make_tiny_model(len(tiny_tokenizer)), tiny_tokenizer, out, make_accelerator(), extra={"stage": "sft"},
                     own=lambda *names: owned.extend(names))
    assert owned[0] == "model.tmp-final" and set(owned[1:]) == {p.name for p in out.iterdir()}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") or p.is_dir()) == []
    assert (out / "model.safetensors").is_file() and json.loads((out / "posttrain.json").read_text()) == {"stage": "sft"}
    assert not (out / "half-written.bin").exists()


def test_the_writability_probe_shows_no_entry_in_the_folder(tmp_path, monkeypatch):
    """check_writable probes an existing folder with an unnamed file (Linux O_TMPFILE): a second
    posttrain process inspecting the folder at that instant saw the old probe folder as a user's file
    and refused with 'holds files posttrain did not write' (the racing-writers test, once in CI)."""
    import tempfile

    from posttrain.utils import check_writable

    def no_named_probe(*a, **k):
        raise AssertionError("a named probe entry was made")

    monkeypatch.setattr(tempfile, "mkdtemp", no_named_probe)
    (tmp_path / "run").mkdir()
    check_writable(tmp_path / "run")
    check_writable(tmp_path / "run" / "new" / "deeper")  # probes the nearest existing folder
    assert os.listdir(tmp_path / "run") == []
