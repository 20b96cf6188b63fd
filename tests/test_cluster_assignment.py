"""
The assignment of sites to instances: balanced, stable when an instance
comes or goes, and the same in every process.
"""

from __future__ import annotations

import math
import subprocess
import sys

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mqttsvc.cluster.assignment import Plan, assign, owner_of, plan, weight

#: 10 to 5,000 distinct site ids, numbered after a prefix as operators
#: name them.
SITE_IDS = st.builds(
    lambda prefix, count: {f"{prefix}{n}" for n in range(count)},
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-", max_size=8),
    st.integers(min_value=10, max_value=5000),
)
INSTANCES = st.integers(min_value=1, max_value=10).map(lambda n: [f"mqttsvc-{i}" for i in range(n)])


def cross_moves(sites: int, instances: int) -> float:
    """
    The most sites that may move between two instances that both stay
    when another joins or leaves.  Quotas keep the counts within one site
    of each other, which plain rendezvous hashing cannot (its spread grows
    like the square root of the sites per instance); the price is that a
    join or a leave also moves some sites between instances that stay:
    measured at most 0.49 * sqrt(sites * instances) over 400 random cases
    of 10 to 2,000 sites on 1 to 10 instances (1.1% of 5,000 sites on 10
    instances, 8% of 100), asserted at twice that.
    """
    return math.sqrt(sites * instances)


def counts(owners: dict[str, str], instances: list[str]) -> list[int]:
    return [sum(1 for o in owners.values() if o == name) for name in instances]


@settings(max_examples=60, deadline=None)
@given(SITE_IDS, INSTANCES)
@example({f"site_{n}" for n in range(5000)}, [f"mqttsvc-{i}" for i in range(10)])
@example({f"site_{n}" for n in range(10)}, [f"mqttsvc-{i}" for i in range(3)])
def test_every_site_has_one_owner_and_the_counts_are_balanced(
    site_ids: set[str], instances: list[str]
) -> None:
    """
    Every site is assigned to one of the instances, and the largest count
    minus the smallest is at most 1 (so at most max(1, 5% of the sites),
    the issue's bound).
    """
    owners = assign(site_ids, instances)
    assert set(owners) == site_ids
    assert set(owners.values()) <= set(instances)
    spread = max(counts(owners, instances)) - min(counts(owners, instances))
    assert spread <= 1 <= max(1, 0.05 * len(site_ids))


@settings(max_examples=40, deadline=None)
@given(SITE_IDS, INSTANCES)
@example({f"site_{n}" for n in range(5000)}, [f"mqttsvc-{i}" for i in range(10)])
@example({f"site_{n}" for n in range(100)}, [f"mqttsvc-{i}" for i in range(10)])
def test_a_join_moves_about_one_nth_mostly_to_the_new_instance(
    site_ids: set[str], instances: list[str]
) -> None:
    """
    When an instance joins N others it gets its quota (about 1/(N+1) of
    the sites); every other site stays where it was, but for at most
    cross_moves() moved between the instances that stay.
    """
    before = assign(site_ids, instances)
    after = assign(site_ids, [*instances, "joiner"])
    moved = {s for s in site_ids if before[s] != after[s]}
    to_new = {s for s in moved if after[s] == "joiner"}
    quota = len(site_ids) // (len(instances) + 1)
    assert quota <= len(to_new) <= quota + 1
    assert len(moved - to_new) <= cross_moves(len(site_ids), len(instances))


@settings(max_examples=40, deadline=None)
@given(SITE_IDS, INSTANCES.filter(lambda names: len(names) >= 2), st.data())
def test_a_leave_moves_the_leavers_sites_and_few_others(
    site_ids: set[str], instances: list[str], data: st.DataObject
) -> None:
    """
    When an instance leaves, each of its sites goes to one that stays;
    at most cross_moves() sites move between instances that stay.
    """
    leaver = data.draw(st.sampled_from(instances))
    before = assign(site_ids, instances)
    after = assign(site_ids, [n for n in instances if n != leaver])
    theirs = {s for s in site_ids if before[s] == leaver}
    others = {s for s in site_ids - theirs if before[s] != after[s]}
    assert leaver not in after.values()
    assert len(others) <= cross_moves(len(site_ids), len(instances))


@given(st.sets(st.text(max_size=8), max_size=50), INSTANCES, st.randoms())
def test_the_order_of_the_arguments_does_not_matter(
    site_ids: set[str], instances: list[str], random: object
) -> None:
    """
    The answer depends on the sets, not on the order they come in.
    """
    shuffled_sites, shuffled_instances = sorted(site_ids), list(instances)
    random.shuffle(shuffled_sites)  # type: ignore[attr-defined]
    random.shuffle(shuffled_instances)  # type: ignore[attr-defined]
    assert assign(site_ids, instances) == assign(shuffled_sites, shuffled_instances)


def test_the_assignment_is_the_same_in_another_process() -> None:
    """
    Another Python process (with another hash seed) computes the same
    weights and owners: no Python hash() is involved.
    """
    code = (
        "from mqttsvc.cluster.assignment import assign, weight\n"
        "owners = assign([f's{i}' for i in range(200)], ['a', 'b', 'c'])\n"
        "print(weight('a', 's1'), ''.join(owners[f's{i}'] for i in range(200)))\n"
    )
    here = f"{weight('a', 's1')} " + "".join(
        assign([f"s{i}" for i in range(200)], ["a", "b", "c"])[f"s{i}"] for i in range(200)
    )
    for seed in ("1", "2"):
        there = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout.strip()
        assert there == here


def test_weights_are_blake2b_of_instance_and_site() -> None:
    """
    The weight is the agreed stable hash, so other implementations (a
    status page, a script) can compute the same owners.
    """
    import hashlib

    expected = hashlib.blake2b(b"inst\x00site_1", digest_size=8).digest()
    assert weight("inst", "site_1") == int.from_bytes(expected, "big")


def test_owner_of_agrees_with_the_assignment() -> None:
    """
    owner_of answers for one site what assign answers for all.
    """
    site_ids = [f"site_{n}" for n in range(30)]
    owners = assign(site_ids, ["a", "b"])
    assert all(owner_of(s, ["b", "a"], site_ids) == owners[s] for s in site_ids)


def test_plan_acquires_what_is_mine_and_hands_over_the_rest() -> None:
    """
    A plan acquires the instance's own sites it does not hold, and hands
    over the sites it holds that are another's or no longer enabled.
    """
    site_ids = [f"site_{n}" for n in range(20)]
    owners = assign(site_ids, ["a", "b"])
    mine = sorted(s for s, o in owners.items() if o == "a")
    theirs = sorted(s for s, o in owners.items() if o == "b")
    held = [mine[0], theirs[0], "disabled_site"]
    assert plan(site_ids, ["b"], "a", held) == Plan(
        acquire=tuple(mine[1:]), hand_over=tuple(sorted([theirs[0], "disabled_site"]))
    )
    assert plan([], ["a"], "a", []) == Plan(acquire=(), hand_over=())
