"""Config: accept_from, relay_for and relay.max_*_per_origin (admission rules)."""

from __future__ import annotations

import pytest

from maildrop.admission import Rules
from maildrop.config import ConfigProblems, parse_config
from tests.unit.test_config import BASE, CFG, err


def test_absent_means_everyone_and_unlimited():
    assert parse_config(BASE, CFG).admission == Rules(None, None, None, None)


def test_lists_and_limits_are_read():
    c = parse_config(BASE + "accept_from: [NodeB, NodeC]\nrelay_for: []\n"
                     "relay:\n  max_bytes_per_origin: 10GiB\n  max_transfers_per_origin: 0\n", CFG)
    assert c.admission == Rules(accept_from=frozenset({"NodeB", "NodeC"}), relay_for=frozenset(),
                                max_bytes_per_origin=10 * 2**30, max_transfers_per_origin=0)


def test_unlimited_is_spelled_out_or_left_out():
    c = parse_config(BASE + "relay:\n  max_bytes_per_origin: unlimited\n"
                     "  max_transfers_per_origin: unlimited\n", CFG)
    assert c.admission == Rules()


def test_unknown_ids_are_fine_a_node_may_be_learned_later():
    assert parse_config(BASE + "relay_for: [NodeZ]\n", CFG).admission.relay_for == {"NodeZ"}


@pytest.mark.parametrize(("text", "message"), [
    ("accept_from: [NodeB, 'no spaces']\n",
     "accept_from[1]: 'no spaces' is not a node id; expected a node id like NodeA"),
    ("relay_for: NodeB\n", "relay_for: got 'NodeB'; expected a list of the node ids"),
    ("relay_for:\n", "relay_for: empty; expected a list of the node ids"),
    ("accept_from: [12]\n", "accept_from[0]: got the number 12; expected a node id like NodeA"),
    ("relay:\n  max_bytes_per_origin: -1\n",
     "relay.max_bytes_per_origin: -1 is negative; expected a size or unlimited"),
    ("relay:\n  max_bytes_per_origin: lots\n",
     "relay.max_bytes_per_origin: 'lots' is not a size; expected a size or unlimited"),
    ("relay:\n  max_transfers_per_origin: -3\n",
     "relay.max_transfers_per_origin: -3 is negative; expected a whole number or unlimited"),
    ("relay:\n  max_transfers_per_origin: 2.5\n",
     "relay.max_transfers_per_origin: 2.5 is not a whole number; expected a whole number or unlimited"),
    ("relay:\n  max_transfer_per_origin: 3\n",
     "relay.max_transfer_per_origin: unknown key (did you mean 'max_transfers_per_origin'?)"),
])  # fmt: skip
def test_bad_values_are_one_line_naming_the_key(text, message):
    assert err(BASE + text).startswith(message)


def test_every_bad_entry_is_reported():
    with pytest.raises(ConfigProblems) as info:
        parse_config(BASE + "accept_from: [bad id, NodeB, also bad]\nrelay:\n  max_transfers_per_origin: -1\n", CFG)
    assert [p.split(": ", 2)[1] for p in info.value.problems] == [
        "accept_from[0]", "accept_from[2]", "relay.max_transfers_per_origin"]
