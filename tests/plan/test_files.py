"""Plan files: JSON + safetensors sidecar, atomic writes, version 1, and every way a file can be bad."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from actsparse.plan import FORMAT, VERSION, PlanError, SparsityPlan, StatTopK, sidecar_path
from tests.plan.builders import D, N, RANK, plan_dict, plan_tensors, predictor_tensors, spec


def _plain_plan() -> SparsityPlan:
    d = plan_dict()
    del d["predictors"]
    return SparsityPlan.from_dict(d)


def _predictor_plan(seed: int = 0) -> SparsityPlan:
    return SparsityPlan.from_dict(plan_dict(), plan_tensors(seed))


def _files(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_sidecar_path(tmp_path):
    assert sidecar_path(tmp_path / "plan.json") == tmp_path / "plan.json.safetensors"
    assert sidecar_path("a/b.json").as_posix() == "a/b.json.safetensors"


def test_round_trip_without_tensors(tmp_path):
    plan = _plain_plan()
    path = plan.save(tmp_path / "sub" / "plan.json")  # makes the folder
    assert path == tmp_path / "sub" / "plan.json"
    assert _files(tmp_path) == ["sub", "sub/plan.json"]  # no sidecar, no .tmp
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == VERSION == 2
    assert "tensor_file" not in data and "tensors" not in data
    back = SparsityPlan.load(path)
    assert back == plan
    assert back.to_dict() == plan.to_dict()
    assert back.stat_topk == StatTopK(0.4, ("attn_in", "mlp_down"), "gaussian")
    # == sees every part: a plan differing in one measured value is another plan
    back.measured["attn.q"] = 0.51
    assert back != plan


def test_round_trip_with_tensors(tmp_path):
    plan = _predictor_plan()
    path = plan.save(tmp_path / "plan.json")
    side = sidecar_path(path)
    assert _files(tmp_path) == ["plan.json", "plan.json.safetensors"]
    data = json.loads(path.read_text())
    assert data["tensor_file"] == side.name  # a name next to the plan, not a path
    assert data["tensors"] == {"predictors/mlp2.down.w1": [RANK, D], "predictors/mlp2.down.w2": [N, RANK],
                               "predictors/mlp2.down.b2": [N]}
    assert set(load_file(str(side))) == set(data["tensors"])
    back = SparsityPlan.load(path)
    assert back == plan
    assert back != _predictor_plan(seed=1)  # same JSON, other tensor values
    # saved as float32 on the CPU, whatever they were
    half = _predictor_plan()
    half.predictor_tensors = {k: v.half() for k, v in half.predictor_tensors.items()}
    back = SparsityPlan.load(half.save(tmp_path / "half.json"))
    assert all(t.dtype == torch.float32 for t in back.predictor_tensors.values())


def test_overwrite_leaves_no_tmp_files(tmp_path):
    path = tmp_path / "plan.json"
    _predictor_plan().save(path)
    _predictor_plan(seed=1).save(path)
    assert _files(tmp_path) == ["plan.json", "plan.json.safetensors"]
    assert SparsityPlan.load(path) == _predictor_plan(seed=1)


def test_failed_save_keeps_the_old_plan(tmp_path):
    path = tmp_path / "plan.json"
    _predictor_plan().save(path)
    before = {p: (tmp_path / p).read_bytes() for p in _files(tmp_path)}
    bad = _predictor_plan(seed=1)
    bad.info["weights"] = torch.zeros(2)  # not JSON
    with pytest.raises(PlanError, match="cannot be written as JSON.*Tensor"):
        bad.save(path)
    assert {p: (tmp_path / p).read_bytes() for p in _files(tmp_path)} == before  # sidecar untouched, no .tmp
    missing = _predictor_plan()
    del missing.predictor_tensors["mlp2.down.b2"]
    with pytest.raises(PlanError, match="has no tensor 'mlp2.down.b2'"):
        missing.save(path)
    assert {p: (tmp_path / p).read_bytes() for p in _files(tmp_path)} == before


# ------------------------------------------------------------------ the sidecar


@pytest.fixture
def saved(tmp_path):
    """A saved predictor plan: (path of plan.json, its JSON)."""
    path = _predictor_plan().save(tmp_path / "plan.json")
    return path, json.loads(path.read_text())


def _rewrite(path, data):
    path.write_text(json.dumps(data))


def test_sidecar_missing(saved):
    path, _ = saved
    sidecar_path(path).unlink()
    with pytest.raises(PlanError, match=r"tensors of .*plan.json not found: .*plan.json.safetensors"):
        SparsityPlan.load(path)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file", b"\xff" * 64])
def test_sidecar_corrupt(saved, content):
    path, _ = saved
    sidecar_path(path).write_bytes(content)
    with pytest.raises(PlanError, match="is not a readable safetensors file"):
        SparsityPlan.load(path)


def test_sidecar_truncated(saved):
    path, _ = saved
    side = sidecar_path(path)
    side.write_bytes(side.read_bytes()[:-10])
    with pytest.raises(PlanError, match="is not a readable safetensors file"):
        SparsityPlan.load(path)


def test_sidecar_lacks_a_listed_tensor(saved):
    path, _ = saved
    side = sidecar_path(path)
    tensors = load_file(str(side))
    del tensors["predictors/mlp2.down.w2"]
    save_file(tensors, str(side))
    with pytest.raises(PlanError, match=r"lacks tensor 'predictors/mlp2.down.w2' that plan.json lists in tensors"):
        SparsityPlan.load(path)


def test_sidecar_tensor_of_wrong_shape(saved):
    path, data = saved
    side = sidecar_path(path)
    tensors = load_file(str(side))
    tensors["predictors/mlp2.down.b2"] = torch.zeros(N + 1)
    save_file(tensors, str(side))
    with pytest.raises(PlanError, match=rf"tensors\['predictors/mlp2.down.b2'\] must have the shape the plan "
                                        rf"lists, \[{N}\], got \[{N + 1}\]"):
        SparsityPlan.load(path)
    # listing and sidecar agree, but the predictor's spec wants another shape
    _rewrite(path, {**data, "tensors": {**data["tensors"], "predictors/mlp2.down.b2": [N + 1]}})
    with pytest.raises(PlanError, match=rf"predictors\['mlp2.down'\]: tensor 'mlp2.down.b2' must have shape \[{N}\]"):
        SparsityPlan.load(path)


def test_sidecar_of_a_kind_without_tensors(saved):
    path, data = saved
    side = sidecar_path(path)
    save_file({**load_file(str(side)), "thresholds/attn.q": torch.zeros(2)}, str(side))
    with pytest.raises(PlanError, match=r"^tensors: .* holds tensors of \['thresholds'\]"):
        SparsityPlan.load(path)


@pytest.mark.parametrize("name", ["../plan.json.safetensors", "sub/plan.json.safetensors", "/abs/x.safetensors",
                                  "..", ".", "", "a\\b"])
def test_tensor_file_with_a_path(saved, name):
    path, data = saved
    _rewrite(path, {**data, "tensor_file": name})
    with pytest.raises(PlanError, match=r"tensor_file must be a file name next to the plan \(no path\), got"):
        SparsityPlan.load(path)


@pytest.mark.parametrize("changes, expected", [
    ({"tensor_file": 3}, r"^tensor_file must be a string, got int"),
    ({"tensor_file": ["plan.json.safetensors"]}, r"^tensor_file must be a string, got list"),
    ({"tensors": ["predictors/mlp2.down.w1"]}, r"^tensors must be a mapping \(a JSON object\), got list"),
    ({"tensors": {"predictors/mlp2.down.b2": 6}}, r"^tensors\['predictors/mlp2.down.b2'\] must be a list, got int"),
    ({"tensors": {"predictors/mlp2.down.b2": [-6]}}, r"^tensors\['predictors/mlp2.down.b2'\] must be an integer "
                                                     r">= 0, got -6"),
    ({"tensors": {"predictors/mlp2.down.b2": [6.0]}}, r"^tensors\['predictors/mlp2.down.b2'\] must be an integer, "
                                                      r"got 6.0"),
])
def test_tensor_listing_rejects(saved, changes, expected):
    path, data = saved
    _rewrite(path, {**data, **changes})
    with pytest.raises(PlanError, match=expected):
        SparsityPlan.load(path)


def test_sidecar_renamed(tmp_path, saved):
    path, data = saved
    sidecar_path(path).rename(tmp_path / "weights.safetensors")
    _rewrite(path, {**data, "tensor_file": "weights.safetensors"})
    assert SparsityPlan.load(path) == _predictor_plan()


# ------------------------------------------------------------------ version 1


def _v1_plan(tmp_path, **changes):
    """A version-1 file, as actsparse wrote them: the predictor sidecar, keys without a kind prefix."""
    tensors = predictor_tensors("mlp.down")
    save_file(tensors, str(tmp_path / "old.json.safetensors"))
    data = {"format": FORMAT, "version": 1, "method": "predictor", "target": 0.5,
            "thresholds": {"attn.o": 0.05}, "predictors": {"mlp.down": spec()},
            "predictor_file": "old.json.safetensors",
            "predictor_tensors": {k: list(v.shape) for k, v in tensors.items()}}
    data.update(changes)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    return path, tensors


def test_reads_version_1(tmp_path):
    path, tensors = _v1_plan(tmp_path)
    plan = SparsityPlan.load(path)
    assert plan.method == "predictor" and plan.target == 0.5
    assert plan.thresholds == {"attn.o": 0.05}
    assert plan.predictors == {"mlp.down": spec()}
    assert plan.predictor_tensors.keys() == tensors.keys()
    assert all(torch.equal(plan.predictor_tensors[k], t) for k, t in tensors.items())
    # written back as version 2, it reads the same
    again = SparsityPlan.load(plan.save(tmp_path / "new.json"))
    assert again == plan
    assert json.loads((tmp_path / "new.json").read_text())["version"] == 2


def test_reads_version_1_without_predictors(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": FORMAT, "version": 1, "thresholds": {"attn.q": 0.1}}))
    assert SparsityPlan.load(path) == SparsityPlan(thresholds={"attn.q": 0.1})


@pytest.mark.parametrize("changes, expected", [
    ({"predictor_tensors": ["mlp.down.w1"]}, r"^predictor_tensors must be a mapping \(a JSON object\), got list"),
    ({"predictor_file": "../old.json.safetensors"}, r"tensor_file must be a file name next to the plan"),
    ({"predictor_file": "gone.safetensors"}, r"tensors of .*old.json not found"),
    ({"predictor_tensors": {"mlp.down.w1": [RANK, D + 1]}}, r"tensors\['predictors/mlp.down.w1'\] must have the "
                                                             r"shape the plan lists"),
])
def test_version_1_rejects(tmp_path, changes, expected):
    path, _ = _v1_plan(tmp_path, **changes)
    with pytest.raises(PlanError, match=expected):
        SparsityPlan.load(path)


def test_version_1_fields_are_unknown_in_version_2(tmp_path):
    path, _ = _v1_plan(tmp_path, version=2)
    with pytest.raises(PlanError, match=r"unknown plan field\(s\) \['predictor_file', 'predictor_tensors'\]"):
        SparsityPlan.load(path)


# ------------------------------------------------------------------ the file itself


@pytest.mark.parametrize("changes, expected", [
    ({"colour": "red"}, r"^unknown plan field\(s\) \['colour'\]; known: .*activation_thresholds"),
    ({"format": "other-plan"}, r"^format must be 'actsparse-plan' .*got 'other-plan'"),
    ({"format": None}, r"^format must be 'actsparse-plan' .*got None"),
    ({"version": 3}, r"^version must be one of 1, 2 .*got 3"),
    ({"version": "2"}, r"^version must be one of 1, 2 .*got '2'"),
    ({"version": 2.0}, r"^version must be one of 1, 2 .*got 2.0"),
    ({"version": True}, r"^version must be one of 1, 2 .*got True"),
    ({"version": None}, r"^version must be one of 1, 2 .*got None"),
])
def test_bad_top_level(tmp_path, changes, expected):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**_plain_plan().to_dict(), **changes}))
    with pytest.raises(PlanError, match=expected):
        SparsityPlan.load(path)


def test_missing_version_and_format(tmp_path):
    path = tmp_path / "plan.json"
    for drop, expected in [("version", "^version must be"), ("format", "^format must be")]:
        d = _plain_plan().to_dict()
        del d[drop]
        path.write_text(json.dumps(d))
        with pytest.raises(PlanError, match=expected):
            SparsityPlan.load(path)


@pytest.mark.parametrize("content, expected", [
    (b"", "is not valid JSON"),
    (b"{'format': 'actsparse-plan'}", "is not valid JSON"),
    (b'{"format": "actsparse-plan",', "is not valid JSON"),
    (b"[1, 2]", r"^the plan file must be a mapping \(a JSON object\), got list"),
    (b'"actsparse-plan"', r"^the plan file must be a mapping \(a JSON object\), got str"),
    (b"null", r"^the plan file must be a mapping \(a JSON object\), got NoneType"),
    (b'{"format": "actsparse-plan", "version": 2, "info": {"x": "\xff\xfe"}}', r"is not a text file \(not UTF-8\)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", r"is not a text file \(not UTF-8\)"),
    (b"[" * 100_000, "nested too deeply|is not valid JSON"),
    (b'{"target": ' + b"1" * 5000 + b"}", "is not a plan: Exceeds the limit"),  # int() refuses so many digits
])
def test_not_a_plan_file(tmp_path, content, expected):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(PlanError, match=expected):
        SparsityPlan.load(path)


def test_utf8_text_is_read(tmp_path):
    plan = _plain_plan()
    plan.info["note"] = "café, 東京"
    path = plan.save(tmp_path / "plan.json")
    path.write_bytes(path.read_bytes().replace(b"\\u00e9", "é".encode()))  # as an editor would save it
    assert "é".encode() in path.read_bytes()
    assert SparsityPlan.load(path).info["note"] == "café, 東京"


def test_missing_plan_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="plan file not found"):
        SparsityPlan.load(tmp_path / "nope.json")
