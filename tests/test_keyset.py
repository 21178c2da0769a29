"""KeyHasher and SeenKeys: exact or hashed keys, and first-seen lookups like a dict."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.keyset import KeyHasher, SeenKeys

HASHED = np.uint64(1 << 63)


def pairs(hasher: KeyHasher, keys: list[str]) -> list[tuple[int, int]]:
    h1, h2 = hasher(pa.array(keys, pa.string()))
    assert h1.dtype == h2.dtype == np.uint64
    return list(zip(h1.tolist(), h2.tolist()))


def is_exact(pair: tuple[int, int]) -> bool:
    return not pair[1] & int(HASHED)


# -- KeyHasher ---------------------------------------------------------------------


def test_prefix_and_digits_are_stored_exactly() -> None:
    keys = ["1001", "#1001", "ORD-000123", "ORD-123", "0", "00", "123456789012345678", "#0"]
    got = pairs(KeyHasher(), keys)
    assert all(is_exact(p) for p in got)
    # the first number is the key's number with the prefix mixed in, reversibly
    golden = 0x9E3779B97F4A7C15
    numbers = [p[0] ^ ((p[1] * golden) % 2**64) for p in got]
    assert numbers == [1001, 1001, 123, 123, 0, 0, 123456789012345678, 0]
    assert got[0][0] != got[1][0]  # 1001 and #1001 no longer share a first number
    # the second number tells the prefixes and the zero padding apart
    assert len(set(got)) == len(keys)
    width = [p[1] & 0xFF for p in got]
    assert width == [0, 0, 6, 0, 0, 2, 0, 0]
    assert got[0][1] >> 8 != got[1][1] >> 8  # "" and "#" are different prefixes
    assert got[2][1] >> 8 == got[3][1] >> 8  # both "ORD-"


@pytest.mark.parametrize(
    "key",
    [
        "abc",
        "",
        "1001a",
        "A1B2",
        "1234567890123456789",  # 19 digits: more than an int64 holds for sure
        "é1001",
        "ORD 1001 ",
        "\t1001",
        "١٢٣",  # Arabic-Indic digits are not [0-9]
        "-",
    ],
)
def test_other_keys_are_hashed(key: str) -> None:
    (pair,) = pairs(KeyHasher(), [key])
    assert not is_exact(pair)
    # hashing is keyed but fixed: another hasher, another batch, the same numbers
    assert pairs(KeyHasher(), ["x", "1", key, "#2"])[2] == pair


def test_exact_and_hashed_keys_never_meet() -> None:
    hasher = KeyHasher()
    got = pairs(hasher, ["1001", "#1001", "01001", "1001 ", "x1001y", "1001x"])
    assert [is_exact(p) for p in got] == [True, True, True, False, False, False]
    assert len(set(got)) == len(got)


key_text = st.one_of(
    st.text(max_size=8),
    st.from_regex(r"\A[#A-Z-]{0,4}[0-9]{1,20}\Z"),
    st.sampled_from(["1001", "#1001", "ORD-1001", "01001", "0", "00", "ORD-", "#"]),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(key_text, max_size=30), st.data())
def test_a_key_is_stored_the_same_way_in_any_batch(keys: list[str], data: st.DataObject) -> None:
    hasher = KeyHasher()
    whole = pairs(hasher, keys)
    # the same hasher, the keys cut into batches of any size and shuffled
    shuffled = data.draw(st.permutations(list(range(len(keys)))))
    at = 0
    while at < len(shuffled):
        size = data.draw(st.integers(1, len(shuffled) - at))
        part = shuffled[at : at + size]
        assert pairs(hasher, [keys[i] for i in part]) == [whole[i] for i in part]
        at += size
    # and equal keys have equal pairs, different keys different ones
    by_key = dict(zip(keys, whole))
    assert len(set(by_key.values())) == len(by_key)
    for k, p in zip(keys, whole):
        assert by_key[k] == p
    # a ChunkedArray is hashed like the same values in one array
    if keys:
        cut = len(keys) // 2
        chunked = pa.chunked_array([keys[:cut], keys[cut:]], pa.string())
        h1, h2 = hasher(chunked)
        assert list(zip(h1.tolist(), h2.tolist())) == whole


def test_empty_batch() -> None:
    h1, h2 = KeyHasher()(pa.array([], pa.string()))
    assert h1.size == h2.size == 0
    assert SeenKeys().add(h1, h2, np.array([], dtype=np.int64)).tolist() == []


# -- SeenKeys ------------------------------------------------------------------------


def test_repeats_inside_one_batch_point_at_the_first() -> None:
    hasher, seen = KeyHasher(), SeenKeys()
    keys = ["1001", "#1001", "1001", "01001", "#1001", "abc", "abc", "1001"]
    h1, h2 = hasher(pa.array(keys))
    where = np.arange(100, 100 + len(keys), dtype=np.int64)
    got = seen.add(h1, h2, where)
    # "1001", "#1001" and "01001" share their first number: still three keys
    assert got.tolist() == [-1, -1, 100, -1, 101, -1, 105, 100]
    assert len(seen) == 4
    h1, h2 = hasher(pa.array(["01001", "zzz", "#1001"]))
    assert seen.add(h1, h2, np.array([7, 8, 9])).tolist() == [103, -1, 101]
    assert len(seen) == 5


def test_equal_first_numbers_across_runs() -> None:
    """Hand-made pairs that share h1 (as a hash collision would), over several runs."""
    seen = SeenKeys()
    one = np.uint64(5)
    assert seen.add(np.array([one]), np.array([np.uint64(1)]), np.array([10])).tolist() == [-1]
    assert seen.add(np.array([one]), np.array([np.uint64(2)]), np.array([11])).tolist() == [-1]
    assert seen.add(np.array([one, one]), np.array([np.uint64(3), np.uint64(3)]),
                    np.array([12, 13])).tolist() == [-1, 12]  # fmt: skip
    h1 = np.array([one] * 4)
    h2 = np.array([3, 1, 2, 4], dtype=np.uint64)
    assert seen.add(h1, h2, np.array([20, 21, 22, 23])).tolist() == [12, 10, 11, -1]
    assert len(seen) == 4


def reference_add(ref: dict[str, int], keys: list[str], where: list[int]) -> list[int]:
    out = []
    for k, w in zip(keys, where):
        out.append(ref.get(k, -1))
        ref.setdefault(k, w)
    return out


seen_keys = st.one_of(
    st.sampled_from(["1", "#1", "01", "001", "ORD-1", "ORD-01", "2", "#2", "a", "b", "A1B"]),
    st.from_regex(r"\A#?[0-9]{1,3}\Z"),
    st.text(max_size=3),
)


@settings(max_examples=120, deadline=None)
@given(st.lists(st.lists(seen_keys, max_size=12), max_size=12))
def test_seen_keys_match_a_dict(batches: list[list[str]]) -> None:
    hasher, seen = KeyHasher(), SeenKeys()
    ref: dict[str, int] = {}
    at = 1000
    for keys in batches:
        where = list(range(at, at + len(keys)))
        at += len(keys) + 5
        h1, h2 = hasher(pa.array(keys, pa.string()))
        got = seen.add(h1, h2, np.array(where, dtype=np.int64))
        assert got.dtype == np.int64
        assert got.tolist() == reference_add(ref, keys, where), keys
        assert len(seen) == len(ref)


def test_many_batches_random_numbers() -> None:
    """Thousands of keys over a hundred batches (runs get merged), against a dict."""
    rng = np.random.default_rng(7)
    hasher, seen = KeyHasher(), SeenKeys()
    ref: dict[str, int] = {}
    prefixes = np.array(["", "#", "ORD-", "0", "X"])
    at = 0
    for _ in range(100):
        n = int(rng.integers(0, 400))
        nums = rng.integers(0, 3000, n)
        pre = prefixes[rng.integers(0, len(prefixes), n)]
        keys = [f"{p}{k}" if p != "X" else f"k{k}x" for p, k in zip(pre.tolist(), nums.tolist())]
        where = list(range(at, at + n))
        at += n
        h1, h2 = hasher(pa.array(keys, pa.string()))
        got = seen.add(h1, h2, np.array(where, dtype=np.int64))
        assert got.tolist() == reference_add(ref, keys, where)
    assert len(seen) == len(ref)


# -- SeenKeys past its memory: sorted runs on disk ------------------------------------

# tiny thresholds so a few keys spill, fill blocks and merge levels; a filter of one
# word answers "maybe" for nearly everything, so the exact lookups decide alone
SPILLING = [
    {"spill_at": 1, "block": 1, "fanout": 2, "filter_words": 1},
    {"spill_at": 3, "block": 2, "fanout": 2, "filter_words": 2},
    {"spill_at": 5, "block": 4, "fanout": 3, "filter_words": 1 << 10},
]


@pytest.mark.parametrize("opts", SPILLING)
@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.lists(seen_keys, max_size=12), max_size=12))
def test_spilling_seen_keys_match_a_dict(
    opts: dict[str, int], batches: list[list[str]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    hasher = KeyHasher()
    seen = SeenKeys(scratch=tmp_path_factory.getbasetemp(), **opts)
    ref: dict[str, int] = {}
    at = 1000
    for keys in batches:
        where = list(range(at, at + len(keys)))
        at += len(keys) + 5
        h1, h2 = hasher(pa.array(keys, pa.string()))
        got = seen.add(h1, h2, np.array(where, dtype=np.int64))
        assert got.tolist() == reference_add(ref, keys, where), keys
        assert len(seen) == len(ref)
        assert seen.in_memory < opts["spill_at"]
    seen.close()


@pytest.mark.parametrize("opts", SPILLING)
def test_equal_first_numbers_across_spills_and_blocks(opts: dict[str, int]) -> None:
    """Pairs that share h1 (as a hash collision would) land in runs on disk."""
    seen = SeenKeys(**opts)
    one, two = np.uint64(5), np.uint64(9)
    for i, (a, b) in enumerate([(one, 1), (two, 1), (one, 2), (one, 3), (two, 2), (one, 4)]):
        got = seen.add(np.array([a]), np.array([b], dtype=np.uint64), np.array([10 + i]))
        assert got.tolist() == [-1]
    assert seen.disk_runs > 0
    h1 = np.array([one, two, one, one, two, one, one, two], dtype=np.uint64)
    h2 = np.array([4, 2, 3, 2, 1, 1, 5, 5], dtype=np.uint64)
    assert seen.add(h1, h2, np.arange(20, 28)).tolist() == [15, 14, 13, 12, 11, 10, -1, -1]
    assert len(seen) == 8
    seen.close()


def test_a_key_seen_before_a_spill_is_a_repeat_after_it() -> None:
    """The first instance wins wherever it is: in memory, on disk, merged or not."""
    seen = SeenKeys(spill_at=4, block=2, fanout=2)
    h = np.arange(1, 41, dtype=np.uint64)
    zeros = np.zeros(40, dtype=np.uint64)
    for i in range(10):  # ten batches of four new keys: ten spills, merged into levels
        part = slice(4 * i, 4 * i + 4)
        assert seen.add(h[part], zeros[part], np.arange(100 * i, 100 * i + 4)).tolist() == [-1] * 4
    assert seen.in_memory == 0
    assert 1 <= seen.disk_runs < 10
    back = np.array([40, 1, 17, 4, 41, 40], dtype=np.uint64)
    got = seen.add(back, np.zeros(6, np.uint64), np.arange(5000, 5006))
    assert got.tolist() == [903, 0, 400, 3, -1, 903]
    # the same numbers with another second number are other keys
    other = seen.add(back[:3], np.ones(3, np.uint64), np.arange(6000, 6003))
    assert other.tolist() == [-1, -1, -1]
    assert len(seen) == 44


def test_many_keys_stay_within_memory_and_match_a_dict() -> None:
    """200,000 random keys, many repeats, through spills, merges and the filter."""
    rng = np.random.default_rng(11)
    seen = SeenKeys(spill_at=5000, block=64, fanout=3, filter_words=1 << 12)
    ref: dict[tuple[int, int], int] = {}
    at = 0
    for _ in range(40):
        n = int(rng.integers(1000, 9000))
        h1 = rng.integers(0, 60000, n).astype(np.uint64)
        h2 = (h1 % np.uint64(3)) * np.uint64(7)  # a second number of its own per key
        where = np.arange(at, at + n, dtype=np.int64)
        at += n
        want = []
        for k, w in zip(zip(h1.tolist(), h2.tolist()), where.tolist()):
            want.append(ref.get(k, -1))
            ref.setdefault(k, w)
        assert seen.add(h1, h2, where).tolist() == want
        assert seen.in_memory < 5000
    assert len(seen) == len(ref)
    assert seen.disk_runs >= 2
    seen.close()
