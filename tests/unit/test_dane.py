"""pymaddy.dane: TLSA matching of certificate chains (RFC 6698 §2.1, RFC 7672 §3)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from pymaddy.dane import Verdict, record_matches, usable, verify
from tests.testca import CA, tlsa_data

MX = "mx.example.net"


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA("dane root", intermediate=True)


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_matches_the_leaf(ca: CA, selector: int, mtype: int) -> None:
    leaf = ca.issue(MX)
    rec = (3, selector, mtype, tlsa_data(leaf.cert, selector, mtype))
    assert record_matches(rec, leaf.der)
    assert verify([rec], leaf.chain_der(), MX) is Verdict.AUTHENTICATED


def test_dane_ee_ignores_name_and_issuer(ca: CA) -> None:
    """RFC 7672 §3.1.1: with DANE-EE the certificate's names and issuer do not matter."""
    leaf = CA("unrelated").issue("some.other.name")
    rec = (3, 1, 1, tlsa_data(leaf.cert, 1, 1))
    assert verify([rec], leaf.chain_der(), MX) is Verdict.AUTHENTICATED


def test_dane_ee_mismatch(ca: CA) -> None:
    leaf, other = ca.issue(MX), ca.issue(MX)
    rec = (3, 1, 1, tlsa_data(other.cert, 1, 1))
    assert verify([rec], leaf.chain_der(), MX) is Verdict.NO_MATCH
    assert verify([rec], [], MX) is Verdict.NO_MATCH


def test_dane_ta_on_the_intermediate_validates_the_chain(ca: CA) -> None:
    leaf = ca.issue(MX)
    rec = (2, 0, 1, tlsa_data(ca.intermediates[0], 0, 1))
    assert verify([rec], leaf.chain_der(), MX) is Verdict.AUTHENTICATED


def test_dane_ta_checks_the_mx_name(ca: CA) -> None:
    """RFC 7672 §3.2.2: with DANE-TA the MX host name is the reference identifier."""
    leaf = ca.issue("wrong.example.net")
    rec = (2, 1, 1, tlsa_data(ca.intermediates[0], 1, 1))
    assert verify([rec], leaf.chain_der(), MX) is Verdict.NO_MATCH


def test_dane_ta_anchor_must_be_in_the_presented_chain(ca: CA) -> None:
    leaf = ca.issue(MX)
    other = CA("other root", intermediate=True)
    rec = (2, 0, 1, tlsa_data(other.intermediates[0], 0, 1))
    assert verify([rec], leaf.chain_der(), MX) is Verdict.NO_MATCH


def test_a_leaf_signed_by_another_ca_does_not_pass_dane_ta(ca: CA) -> None:
    other = CA("other root", intermediate=True)
    leaf = other.issue(MX)
    # the presented chain carries *our* intermediate, which did not sign the leaf
    chain = [leaf.der, ca.intermediates[0].public_bytes(Encoding.DER)]
    rec = (2, 0, 1, tlsa_data(ca.intermediates[0], 0, 1))
    assert verify([rec], chain, MX) is Verdict.NO_MATCH


def test_pkix_usages_and_unknown_parameters_are_unusable(ca: CA) -> None:
    """RFC 7672 §3.1: PKIX-TA(0)/PKIX-EE(1) are not used for SMTP; unknown selectors/types skipped."""
    leaf = ca.issue(MX)
    recs = [
        (1, 1, 1, tlsa_data(leaf.cert, 1, 1)),
        (0, 1, 1, tlsa_data(leaf.cert, 1, 1)),
        (3, 2, 1, b"x"),
        (3, 1, 3, b"x"),
    ]
    assert usable(recs) == []
    assert verify(recs, leaf.chain_der(), MX) is Verdict.NO_USABLE_RECORDS
    assert verify([], leaf.chain_der(), MX) is Verdict.NO_USABLE_RECORDS


def test_any_matching_record_of_a_set_is_enough(ca: CA) -> None:
    leaf = ca.issue(MX)
    recs = [(3, 1, 1, b"\0" * 32), (3, 1, 1, tlsa_data(leaf.cert, 1, 1))]
    assert verify(recs, leaf.chain_der(), MX) is Verdict.AUTHENTICATED
