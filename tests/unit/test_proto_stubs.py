"""The committed stubs are exactly what protoc generates from the committed contract."""
import importlib.util
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _generate():
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stub", _generate().STUBS)
def test_committed_stub_equals_a_fresh_protoc_run(tmp_path, stub):
    gen = _generate()

    gen.generate(tmp_path)

    assert (tmp_path / stub).read_text() == (REPO / "proto" / stub).read_text(), (
        f"proto/{stub} is stale: run `make proto` and commit the result")
