"""Prices per model, per million tokens, in integer micro-units of the currency."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass


@dataclass(frozen=True)
class Price:
    input_per_million_micros: int
    output_per_million_micros: int


@dataclass(frozen=True)
class PriceList:
    currency: str
    models: dict[str, Price]

    def price(self, model: str) -> Price:
        """An unpriced model still gets its usage recorded, at zero: tokens are never dropped."""
        return self.models.get(model, Price(0, 0))


def load_prices(path: str) -> PriceList:
    with open(path, "rb") as f:
        document = tomllib.load(f)
    models = {}
    for name, entry in document.get("models", {}).items():
        price = Price(int(entry["input_per_million_micros"]), int(entry["output_per_million_micros"]))
        if price.input_per_million_micros < 0 or price.output_per_million_micros < 0:
            raise ValueError(f"{path}: negative price for {name}")
        models[name] = price
    return PriceList(document.get("currency", "USD"), models)


def cost_micros(prompt_tokens: int, completion_tokens: int, price: Price) -> int:
    """Integer micro-units, rounded down once (apply it to totals, not to each request)."""
    return (prompt_tokens * price.input_per_million_micros + completion_tokens * price.output_per_million_micros) // 1_000_000
