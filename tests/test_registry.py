"""The file-based model registry: numbering, immutability, the champion alias under concurrency,
rollback, and clear errors for a missing or damaged registry."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from tasks import registry
from tasks.registry import RegistryError


def model_file(tmp_path: Path, name: str, content: bytes | None = None) -> Path:
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if content is not None else name.encode() * 100)
    return path


def add(root: Path, tmp_path: Path, name: str, **meta) -> str:
    version, created = registry.register(root, {"model.onnx": model_file(tmp_path, name)}, {"note": name, **meta})
    assert created
    return version


def test_versions_are_numbered_immutable_folders_with_metadata(tmp_path):
    root = tmp_path / "reg"
    card = model_file(tmp_path, "card.md", b"# card")
    v1, created = registry.register(root, {"model.onnx": model_file(tmp_path, "a.onnx"), "model_card.md": card},
                                    {"metrics": {"accuracy": 0.9}, "checkpoint_sha256": "abc"})
    assert (v1, created) == ("v0001", True)
    assert add(root, tmp_path, "b.onnx") == "v0002"
    assert registry.list_versions(root) == ["v0001", "v0002"]
    meta = registry.read_metadata(root, "1")
    assert meta["version"] == "v0001" and meta["metrics"] == {"accuracy": 0.9} and meta["checkpoint_sha256"] == "abc"
    assert meta["created_at"] and len(meta["onnx_sha256"]) == 64
    assert set(meta["files"]) == {"model.onnx", "model_card.md"}
    assert (root / "versions/v0001/model_card.md").read_text() == "# card"
    assert not [p for p in root.iterdir() if p.name.startswith(".staging")]  # nothing half-built left


def test_the_same_onnx_file_is_never_registered_twice(tmp_path):
    root = tmp_path / "reg"
    onnx = model_file(tmp_path, "a.onnx")
    assert registry.register(root, {"model.onnx": onnx}, {}) == ("v0001", True)
    assert registry.register(root, {"model.onnx": onnx}, {"other": 1}) == ("v0001", False)
    assert registry.list_versions(root) == ["v0001"]


def test_promote_and_rollback_move_the_alias_and_keep_history(tmp_path):
    root = tmp_path / "reg"
    for name in ("a", "b", "c"):
        add(root, tmp_path, name)
    assert registry.read_champion(root) is None
    alias, changed = registry.promote(root, "v1")
    assert changed and alias["version"] == "v0001" and alias["history"] == []
    assert alias["path"] == "versions/v0001/model.onnx"
    registry.promote(root, "2")
    alias, changed = registry.promote(root)  # default: the newest version
    assert changed and alias["version"] == "v0003" and alias["history"] == ["v0001", "v0002"]
    assert registry.promote(root, "v0003")[1] is False  # already the champion: no change, no history entry
    assert registry.champion_model(root) == root / "versions/v0003/model.onnx"
    assert registry.rollback(root)["version"] == "v0002"
    alias = registry.rollback(root)
    assert alias["version"] == "v0001" and alias["history"] == []
    assert json.loads((root / "champion.json").read_text())["version"] == "v0001"
    with pytest.raises(RegistryError, match="first champion.*no previous champion"):
        registry.rollback(root)
    assert registry.list_versions(root) == ["v0001", "v0002", "v0003"]  # rollback never deletes a version


def test_conditional_promotion_refuses_when_the_champion_changed(tmp_path):
    root = tmp_path / "reg"
    for name in ("a", "b", "c"):
        add(root, tmp_path, name)
    registry.promote(root, "v1")
    registry.promote(root, "v3")  # someone else promoted v3 after our gate judged v2 against v1
    with pytest.raises(RegistryError, match="compared against v0001, the champion is now v0003"):
        registry.promote(root, "v2", expected="v0001")
    assert registry.read_champion(root)["version"] == "v0003"
    assert registry.promote(root, "v2", expected="v0003")[0]["version"] == "v0002"


def _promote_many(root: str, versions: list[str], out) -> None:
    for v in versions:
        registry.promote(root, v)
    out.put("done")


def _register_one(root: str, src: str, out) -> None:
    out.put(registry.register(root, {"model.onnx": Path(src)}, {})[0])


def test_concurrent_registrations_get_distinct_numbers(tmp_path):
    root = tmp_path / "reg"
    sources = [model_file(tmp_path, f"m{i}.onnx") for i in range(6)]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_register_one, args=(str(root), str(s), out)) for s in sources]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = sorted(out.get(timeout=5) for _ in procs)
    assert got == [f"v000{i}" for i in range(1, 7)]
    assert registry.list_versions(root) == got


def test_concurrent_promotions_serialize_and_leave_a_valid_alias(tmp_path):
    root = tmp_path / "reg"
    versions = [add(root, tmp_path, f"m{i}") for i in range(4)]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    # two writers flip the alias back and forth many times at once
    procs = [ctx.Process(target=_promote_many, args=(str(root), (versions[:2] if i == 0 else versions[2:]) * 15, out))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    alias = registry.read_champion(root)  # parses: never a half-written file
    assert alias["version"] in versions
    # every promotion that changed the alias pushed exactly one history entry: 60 promotions, 1 first
    assert len(alias["history"]) == 59
    assert all(a != b for a, b in zip(alias["history"], alias["history"][1:] + [alias["version"]]))


def test_clear_errors_for_unknown_versions_and_an_empty_or_damaged_registry(tmp_path):
    root = tmp_path / "reg"
    with pytest.raises(RegistryError, match="no versions to promote"):
        registry.promote(root)
    with pytest.raises(RegistryError, match=r"no champion \(.*champion.json does not exist\): nothing to roll back"):
        registry.rollback(root)
    add(root, tmp_path, "a")
    with pytest.raises(RegistryError, match="has no version v0007 \\(versions: v0001\\)"):
        registry.promote(root, "7")
    with pytest.raises(RegistryError, match="'latest' is not a version"):
        registry.promote(root, "latest")
    (root / "champion.json").write_text("{not json")
    with pytest.raises(RegistryError, match="champion.json is not valid JSON"):
        registry.read_champion(root)
    (root / "champion.json").write_text(json.dumps({"version": "v0009", "history": []}))
    with pytest.raises(RegistryError, match="names version v0009, which is not in"):
        registry.rollback(root)
    (root / "champion.json").write_text(json.dumps({"history": []}))
    with pytest.raises(RegistryError, match="'version' should be a version name"):
        registry.read_champion(root)
    (root / "versions/v0001/metadata.json").unlink()
    with pytest.raises(RegistryError, match="metadata.json is missing"):
        registry.read_metadata(root, "v1")
    with pytest.raises(RegistryError, match="needs a model.onnx"):
        registry.register(root, {}, {})


def test_a_champion_alias_naming_a_missing_version_says_how_to_repair_and_promote_repairs_it(tmp_path):
    """Issue 32: the champion's version folder deleted. Reading, rolling back and serving fail naming the fix;
    promote N rewrites the alias, keeping what still holds of its history."""
    import shutil

    root = tmp_path / "reg"
    for name in ("a", "b", "c"):
        add(root, tmp_path, name)
    registry.promote(root, "1")
    registry.promote(root, "3")
    shutil.rmtree(root / "versions" / "v0003")
    fix = r"repair the alias with `finetune promote VERSION` \(versions: v0001, v0002\)"
    with pytest.raises(registry.DamagedAlias, match=f"names version v0003, which is not in .*; {fix}"):
        registry.read_champion(root)
    with pytest.raises(registry.DamagedAlias, match=fix):
        registry.rollback(root)
    with pytest.raises(registry.DamagedAlias, match=fix):  # a conditional promotion cannot judge against it
        registry.promote(root, "2", expected="v0003")
    alias, changed = registry.promote(root, "2", by_hand=True)
    assert changed and alias["version"] == "v0002" and alias["history"] == ["v0001"]
    assert registry.read_champion(root)["version"] == "v0002" and registry.rollback(root)["version"] == "v0001"
    (root / "champion.json").write_text("{not json")
    with pytest.raises(registry.DamagedAlias, match=f"not valid JSON .*; {fix}"):
        registry.read_champion(root)
    assert registry.promote(root, "1")[0]["version"] == "v0001"  # a file that is not even JSON is repaired too


def test_the_registry_commands_list_and_repair_a_damaged_alias(tmp_path):
    """The CLI as an operator meets it: `registry list` still lists, `rollback` and `serve` say how to repair,
    `promote N` repairs."""
    import shutil
    import subprocess
    import sys

    from tasks.promote.serving_check import ServerProcess
    from tests.conftest import brightness_onnx

    root = tmp_path / "reg"
    for i in range(2):
        registry.register(root, {"model.onnx": brightness_onnx(tmp_path / f"m{i}.onnx", ["a", "b"],
                                                               threshold=100.0 + i)}, {})
    registry.promote(root, "1")
    registry.promote(root, "2")
    shutil.rmtree(root / "versions" / "v0002")
    finetune = str(Path(sys.executable).parent / "finetune")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([finetune, *args, "--registry", str(root)], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, check=False)

    listed = run("registry", "list")  # still lists the versions to repair it with, and exits 1: it is damaged
    assert listed.returncode == 1 and "v0001" in listed.stdout and "champion: none usable:" in listed.stderr
    assert "names version v0002, which is not in" in listed.stderr and "finetune promote VERSION" in listed.stderr
    rolled = run("rollback")
    assert rolled.returncode == 1 and "finetune promote VERSION" in rolled.stderr and "Traceback" not in rolled.stderr
    with ServerProcess("champion", "--registry", str(root)) as server, pytest.raises(
            Exception, match="exited with code 1 before it was ready: .*names version v0002, which is not in .*repair "
                             "the alias with `finetune promote VERSION`"):
        server.wait_ready(60)
    server.cleanup()
    promoted = run("promote", "1")
    assert promoted.returncode == 0, promoted.stderr
    assert "champion: v0001 (the alias is repaired; it was damaged:" in promoted.stdout
    listed = run("registry", "list")
    assert "*  v0001" in listed.stdout and "champion: v0001" in listed.stdout


def test_a_version_of_thousands_of_digits_is_not_a_version():
    with pytest.raises(RegistryError, match="is not a version"):
        registry.parse_version("9" * 5000)
    assert registry.parse_version("v000000003") == "v0003"


# ---- the promote stage ----------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path):
    """What the export stage leaves: an ONNX model with metadata, a card, and the gate's verdict."""
    from tasks.files import sha256_file, write_json
    from tests.conftest import brightness_onnx, make_dataset

    out = tmp_path / "ws"
    (out / "int8").mkdir(parents=True)
    (out / "model_card.md").write_text("# card")
    make_dataset(out / "images", classes=("dim", "lit"), per_class=1, size=32)  # one dark, one bright test image
    (out / "predictions.csv").write_text("path,actual,predicted,p_bright,p_dark\n"
                                         "dim/000.png,dark,dark,0.1,0.9\nlit/000.png,bright,bright,0.9,0.1\n")
    candidate = {"checkpoint_sha256": "c" * 64, "predictions_sha256": sha256_file(out / "predictions.csv")}
    brightness_onnx(out / "model.onnx", ["bright", "dark"], extra={"candidate": json.dumps(candidate)})
    write_json(out / "metrics.json", {"accuracy": 0.9, "macro_f1": 0.88, "n": 10, "ci": {"accuracy": [0.8, 1.0]}})
    write_json(out / "verdict.json", {"passed": True, "reason": "all gates passed",
                                      "champion": {"status": "none", "version": None}, "candidate": candidate})
    return out


def promote_stage(ws: Path, root: Path) -> dict:
    from tasks import promote

    return promote.run(ws / "model.onnx", ws / "int8", ws / "model_card.md", ws / "verdict.json", ws / "metrics.json",
                       ws / "predictions.csv", root, ws / "promote.json", images_dir=ws / "images")


def test_promote_stage_registers_once_and_moves_the_alias(exported, tmp_path):
    root = tmp_path / "reg"
    report = promote_stage(exported, root)
    assert report == {**report, "version": "v0001", "registered": True, "promoted": True, "champion": "v0001",
                      "previous_champion": None}
    meta = registry.read_metadata(root, "v0001")
    assert meta["source"] == "pipeline" and meta["checkpoint_sha256"] == "c" * 64
    assert meta["metrics"] == {"accuracy": 0.9, "macro_f1": 0.88, "n": 10} and meta["classes"] == ["bright", "dark"]
    assert set(meta["files"]) == {"model.onnx", "model_card.md", "predictions.csv"}  # no INT8 file was kept
    again = promote_stage(exported, root)  # idempotent: the same ONNX file is not a second version
    assert (again["version"], again["registered"], again["promoted"]) == ("v0001", False, False)
    assert registry.list_versions(root) == ["v0001"]


def test_promote_stage_refuses_a_failed_verdict_and_a_changed_champion(exported, tmp_path):
    from tasks.files import write_json
    from tasks.promote import PromotionRefused

    root = tmp_path / "reg"
    verdict = json.loads((exported / "verdict.json").read_text())
    write_json(exported / "verdict.json", {**verdict, "passed": False, "reason": "gate failed: accuracy 0.5 < 0.9"})
    with pytest.raises(PromotionRefused, match="gate did not pass .*accuracy 0.5 < 0.9.*nothing is promoted"):
        promote_stage(exported, root)
    assert registry.list_versions(root) == []
    # judged with no champion, but meanwhile someone promoted one: refused before anything is registered
    registry.promote(root, add(root, tmp_path, "other"))
    write_json(exported / "verdict.json", verdict)
    with pytest.raises(PromotionRefused, match="champion changed since the gate judged.*now v0001.*nothing is promoted"):
        promote_stage(exported, root)
    assert registry.read_champion(root)["version"] == "v0001" and registry.list_versions(root) == ["v0001"]


def test_promote_stage_refuses_a_verdict_about_another_candidate(exported, tmp_path):
    """Export and promote can rerun while the gate does not: the verdict must be about this exact model."""
    from tasks.files import write_json
    from tasks.promote import PromotionRefused

    root = tmp_path / "reg"
    verdict = json.loads((exported / "verdict.json").read_text())
    write_json(exported / "verdict.json", {**verdict, "candidate": {**verdict["candidate"], "checkpoint_sha256": "d" * 64}})
    with pytest.raises(PromotionRefused, match="judged checkpoint dddddddddddd.*exported model is of cccccccccccc"):
        promote_stage(exported, root)
    write_json(exported / "verdict.json", verdict)
    (exported / "predictions.csv").write_text("path,actual,predicted\nx.png,bright,bright\n")
    with pytest.raises(PromotionRefused, match="predictions.csv changed since the gate judged it"):
        promote_stage(exported, root)
    assert registry.list_versions(root) == []


def test_a_rolled_back_model_stays_rolled_back_until_a_person_promotes_it(exported, tmp_path):
    from tasks.promote import PromotionRefused

    root = tmp_path / "reg"
    registry.promote(root, add(root, tmp_path, "first"))  # v0001, champion
    verdict = json.loads((exported / "verdict.json").read_text())
    (exported / "verdict.json").write_text(json.dumps({**verdict, "champion": {"status": "compared", "version": "v0001"}}))
    assert promote_stage(exported, root)["champion"] == "v0002"
    alias = registry.rollback(root)
    assert alias["version"] == "v0001" and alias["rolled_back"] == ["v0002"]
    # the next pipeline run (say, after an export.* change) must not bring it back
    with pytest.raises(PromotionRefused, match="was rolled back \\(v0002\\).*finetune promote"):
        promote_stage(exported, root)
    with pytest.raises(RegistryError, match="v0002 was rolled back"):
        registry.promote(root, "v0002")
    assert registry.read_champion(root)["version"] == "v0001"
    alias, changed = registry.promote(root, "v0002", by_hand=True)  # a person's decision
    assert changed and alias["version"] == "v0002" and alias["rolled_back"] == []


def test_a_reexport_of_the_champions_checkpoint_is_promoted(exported, tmp_path):
    """After our own promotion, an export.* change re-exports the same checkpoint (new ONNX bytes): that is the
    champion's model again, not a stale verdict."""
    from tests.conftest import brightness_onnx

    root = tmp_path / "reg"
    assert promote_stage(exported, root)["champion"] == "v0001"
    meta = registry.read_metadata(root, "v0001")
    brightness_onnx(exported / "model.onnx", ["bright", "dark"], size=32, threshold=127.0,
                    extra={"candidate": json.dumps(meta["candidate"])})
    report = promote_stage(exported, root)
    assert report["version"] == "v0002" and report["champion"] == "v0002" and report["previous_champion"] == "v0001"


def test_registering_a_model_by_hand_reads_its_lineage_from_the_onnx_metadata(exported, tmp_path):
    from tasks.promote import register_file

    root = tmp_path / "reg"
    assert register_file(exported / "model.onnx", root, model_card=exported / "model_card.md", note="reviewed") == \
        ("v0001", True)
    meta = registry.read_metadata(root, "v0001")
    assert meta["source"] == "manual" and meta["note"] == "reviewed" and meta["classes"] == ["bright", "dark"]
    assert meta["preprocessing"] == {"size": 32} and meta["checkpoint_sha256"] is None
    assert register_file(exported / "model.onnx", root) == ("v0001", False)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(RegistryError, match="junk.onnx: not a readable ONNX model"):
        register_file(tmp_path / "junk.onnx", root)
