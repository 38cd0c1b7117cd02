"""Which prompt prefixes the CPU model keeps and reuses: whole blocks, longest first, LRU."""

from __future__ import annotations

from triton_model.prefix_cache import Hit, PrefixCache


def cache(budget=100, ids=(10, 11)):
    forgotten, copied = [], []
    prefixes = PrefixCache(ids, budget, block_tokens=4, forget=forgotten.append)
    return prefixes, forgotten, copied


def test_whole_blocks_are_kept_and_the_longest_shared_prefix_is_found():
    prefixes, _, copied = cache()
    prefixes.keep(list(range(10)), lambda seq, n: copied.append((seq, n)))  # 10 tokens: two blocks kept
    assert copied == [(11, 8)]
    assert prefixes.lookup(list(range(10))) == Hit(11, 8)
    assert prefixes.lookup([0, 1, 2, 3, 4, 5, 99, 7, 8]) == Hit(11, 4)  # shares 6 tokens: one whole block
    assert prefixes.lookup([1, 2, 3, 4, 5]) is None
    # at least the prompt's last token is left to evaluate: its logits start the completion
    assert prefixes.lookup(list(range(8))) == Hit(11, 4)


def test_a_prefix_kept_already_is_not_kept_twice_and_short_prompts_are_not_kept():
    prefixes, _, copied = cache()
    keep = lambda seq, n: copied.append((seq, n))  # noqa: E731
    prefixes.keep(list(range(9)), keep)
    prefixes.keep(list(range(8)), keep)
    prefixes.keep([1, 2, 3], keep)
    assert copied == [(11, 8)]


def test_past_the_budget_or_the_ids_the_least_recently_used_goes():
    prefixes, forgotten, copied = cache(budget=10)
    keep = lambda seq, n: copied.append((seq, n))  # noqa: E731
    prefixes.keep([1] * 8, keep)
    prefixes.keep([2] * 4, keep)  # 8 + 4 > 10: the first goes
    assert forgotten == [11] and prefixes.tokens == 4
    prefixes.keep([3] * 4, keep)
    prefixes.lookup([2] * 8)  # [2]*4 is now the most recently used
    prefixes.keep([4] * 4, keep)  # no id left: the least recently used, [3]*4, goes
    assert forgotten == [11, 10]
    assert prefixes.lookup([3] * 5) is None and prefixes.lookup([2] * 5) is not None
    assert prefixes.lookup([4] * 5) == Hit(10, 4)
