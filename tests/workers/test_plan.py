import pytest

from blobchain.layers.errors import ConflictingParent, MissingParent, ParentCycle
from blobchain.layers.records import RefRecord, RefSpec
from blobchain.workers.plan import make_plan


def _none(_: str) -> None:
    return None


def test_orders_parents_first_and_dedupes():
    specs = [RefSpec("c", "/c", "b"), RefSpec("a", "/a"), RefSpec("b", "/b", "a"), RefSpec("c", "/c", "b")]
    plan = make_plan(specs, _none)
    assert plan.order == ("a", "b", "c")
    assert plan.chain("c") == ["a", "b", "c"]


def test_missing_parent():
    with pytest.raises(MissingParent):
        make_plan([RefSpec("b", "/b", "a")], _none)


def test_known_parent_from_store_is_fine():
    known = {"a": RefRecord(RefSpec("a", "/a"))}
    plan = make_plan([RefSpec("b", "/b", "a")], known.get)
    assert plan.order == ("a", "b")


def test_cycle():
    with pytest.raises(ParentCycle):
        make_plan([RefSpec("a", "/a", "b"), RefSpec("b", "/b", "a")], _none)


def test_one_ref_two_parents_in_one_submission():
    with pytest.raises(ConflictingParent):
        make_plan(
            [RefSpec("p", "/p"), RefSpec("q", "/q"), RefSpec("c", "/c", "p"), RefSpec("c", "/c", "q")], _none
        )


def test_one_ref_two_parents_against_the_store():
    known = {"c": RefRecord(RefSpec("c", "/c", "p")), "p": RefRecord(RefSpec("p", "/p"))}
    with pytest.raises(ConflictingParent):
        make_plan([RefSpec("q", "/q"), RefSpec("c", "/c", "q")], known.get)
