"""Prices per model, per million tokens, in integer micro-units of the currency, and the pricing
policy: billing_svc prices the ledger with them, the edge holds spend budgets with the same."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass


@dataclass(frozen=True)
class Price:
    input_per_million_micros: int
    output_per_million_micros: int
    #: prompt tokens served from a cached prefix (None in the file: the input price)
    cached_input_per_million_micros: int | None = None

    @property
    def cached_input(self) -> int:
        cached = self.cached_input_per_million_micros
        return self.input_per_million_micros if cached is None else cached

    def discounted(self, percent: int) -> Price:
        """These prices less percent (the batch discount), rounded down."""
        def off(micros: int) -> int:
            return micros * (100 - percent) // 100
        return Price(off(self.input_per_million_micros), off(self.output_per_million_micros), off(self.cached_input))


FREE = Price(0, 0, 0)


@dataclass(frozen=True)
class PriceList:
    currency: str
    models: dict[str, Price]
    #: batch jobs' requests cost this percent less
    batch_discount_percent: int = 0

    def price(self, model: str) -> Price:
        """An unpriced model still gets its usage recorded, at zero: tokens are never dropped."""
        return self.models.get(model, FREE)

    def billed(self, model: str, outcome: str, batch: bool = False) -> Price:
        """The pricing policy: every request is recorded with its tokens and outcome; one that
        failed through our fault (an error after it was accepted: an error event mid-stream, a
        5xx; or cut by the edge's crash: `interrupted`) is priced at zero; one the client
        cancelled pays for what was generated until then; a batch job's at the batch discount."""
        if outcome in ("failed_mid_stream", "interrupted"):
            return FREE
        price = self.price(model)
        return price.discounted(self.batch_discount_percent) if batch else price


def load_prices(path: str) -> PriceList:
    with open(path, "rb") as f:
        document = tomllib.load(f)
    models = {}
    for name, entry in document.get("models", {}).items():
        cached = entry.get("cached_input_per_million_micros")
        price = Price(int(entry["input_per_million_micros"]), int(entry["output_per_million_micros"]),
                      None if cached is None else int(cached))
        if min(price.input_per_million_micros, price.output_per_million_micros, price.cached_input) < 0:
            raise ValueError(f"{path}: negative price for {name}")
        models[name] = price
    discount = int(document.get("batch_discount_percent", 0))
    if not 0 <= discount <= 100:
        raise ValueError(f"{path}: batch_discount_percent must be 0 to 100")
    return PriceList(document.get("currency", "USD"), models, discount)


def cost_picos(prompt_tokens: int, completion_tokens: int, price: Price, cached_tokens: int = 0) -> int:
    """Exact integer pico-units of the currency (tokens × micro-units per million)."""
    return ((prompt_tokens - cached_tokens) * price.input_per_million_micros + cached_tokens * price.cached_input
            + completion_tokens * price.output_per_million_micros)


def cost_micros(prompt_tokens: int, completion_tokens: int, price: Price, cached_tokens: int = 0) -> int:
    """Integer micro-units, rounded down once (apply it to totals, not to each request)."""
    return cost_picos(prompt_tokens, completion_tokens, price, cached_tokens) // 1_000_000
