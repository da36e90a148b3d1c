"""Identifiers from the network (issue 9, finding 13): file names and node ids."""

import unicodedata

import pytest

from maildrop import ids


@pytest.mark.parametrize("name", [
    "COM\u00b9", "COM\u00b2", "com\u00b3.txt", "LPT\u00b9", "lpt\u00b2.tar.gz", "LPT\u00b3",
    "CON", "nul.txt", "Aux", "CONIN$", "conout$.log", "CON .txt", "NUL. .txt",
    "trailing.", "trailing ", "dots...", "a:b", "a*b", "a?b", "a|b", "a<b", "a>b", 'a"b',
    "..", ".", ".hidden", "a/b", "a\\b", "x\x00y", "new\nline", "", "a" * 256,
    "bidi\u202etxt.exe", "zero\u200bwidth", "line\u2028sep", "\ud800",
])
def test_f13_unportable_names_are_refused(name):
    assert ids.safe_file_name(name) is None


@pytest.mark.parametrize("name", [
    "report.pdf", "COM10.txt", "CONSOLE", "COMPUTE.txt", "com.txt", "a b.txt", "Zürich (1).jpg",
    "日本語.txt", "x" * 255, "é" * 127,
])
def test_f13_ordinary_names_pass_unchanged(name):
    assert ids.safe_file_name(name) == name


def test_f13_names_come_back_in_nfc():
    nfd = unicodedata.normalize("NFD", "résumé.txt")
    assert nfd != "résumé.txt"
    assert ids.safe_file_name(nfd) == "résumé.txt"
    # The byte limit is on the NFC form that is used: 100 "é" are 300 bytes in NFD
    # (3 bytes each) but 200 in NFC, so the name is fine.
    assert ids.safe_file_name("e\u0301" * 100) == "é" * 100


def test_f13_node_ids_that_differ_only_by_case_fold_to_one():
    assert ids.fold_node_id("NodeA") == ids.fold_node_id("nodea") == ids.fold_node_id("NODEA")
    assert ids.fold_node_id("NodeA") != ids.fold_node_id("NodeB")
    with pytest.raises(ValueError):
        ids.fold_node_id("../x")
