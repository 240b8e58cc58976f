"""Where a token comes from (optserve/net.py `load_token`, used by shards, client commands and
RemoteAdam through Security.from_env): the given file, else OPTSERVE_TOKEN, else the file
OPTSERVE_TOKEN_FILE names; a file that cannot be read or is empty is an error naming it."""
from __future__ import annotations

import pytest

from optserve.client.security import Security
from optserve.net import load_token


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.delenv("OPTSERVE_TOKEN", raising=False)
    monkeypatch.delenv("OPTSERVE_TOKEN_FILE", raising=False)
    for name in ("given", "env"):
        (tmp_path / name).write_text(f"{name}-token\n")
    return tmp_path


def test_no_token_anywhere_is_no_token(files):
    assert load_token() == ""
    assert Security.from_env().metadata() == ()


def test_the_file_named_by_OPTSERVE_TOKEN_FILE(files, monkeypatch):
    monkeypatch.setenv("OPTSERVE_TOKEN_FILE", str(files / "env"))

    assert load_token() == "env-token"
    assert Security.from_env().token == "env-token"


def test_OPTSERVE_TOKEN_comes_before_the_file(files, monkeypatch):
    monkeypatch.setenv("OPTSERVE_TOKEN_FILE", str(files / "env"))
    monkeypatch.setenv("OPTSERVE_TOKEN", "value-token")

    assert load_token() == "value-token"
    assert Security.from_env().token == "value-token"


def test_a_given_file_or_token_comes_first(files, monkeypatch):
    monkeypatch.setenv("OPTSERVE_TOKEN_FILE", str(files / "env"))
    monkeypatch.setenv("OPTSERVE_TOKEN", "value-token")

    assert load_token(str(files / "given")) == "given-token"
    assert Security.from_env(token="argument").token == "argument"


@pytest.mark.parametrize("content, words", [(None, "No such file"), ("  \n", "is empty")])
def test_a_missing_or_empty_file_is_an_error_naming_it(files, monkeypatch, content, words):
    path = files / "broken"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("OPTSERVE_TOKEN_FILE", str(path))

    for read in (load_token, Security.from_env):
        with pytest.raises(ValueError, match=words) as err:
            read()
        assert str(path) in str(err.value)
