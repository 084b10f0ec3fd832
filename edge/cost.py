"""What a request cost, in USD, from the usage its provider reported (sans I/O).

Prices come from PROVIDERS_FILE, per target (`input_per_mtok`, `output_per_mtok`,
`cached_input_per_mtok`, USD per million tokens), or a `[[models]]` entry's `price = {...}` for
its targets that set none (edge.routing.providers). The request's cost is its answer's usage at
the prices of the target that answered: input tokens not read from a prompt cache at the input
price, cache reads at the cached price (the input price when none is set), output tokens at the
output price. A request without usage, or answered by a target without prices, has no cost
(None); an answer from the response cache costs nothing (0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PER_MTOK = 1_000_000
FIELDS = ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok")
MAX_PRICE = 1_000_000.0  # USD per million tokens: far above any price, below any typo's 1e12


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float = 0.0
    output: float = 0.0
    cached_input: float | None = None  # None: cache reads at the input price

    def cost(self, prompt: int, completion: int, cached: int = 0) -> float:
        """USD for `prompt` input tokens (`cached` of them read from a prompt cache) and
        `completion` output tokens."""
        # A hostile or broken upstream may report negative counts: never a negative cost (a
        # counter that went down would corrupt every rate computed over it).
        prompt = prompt if prompt > 0 else 0
        completion = completion if completion > 0 else 0
        cached = 0 if cached < 0 else (prompt if cached > prompt else cached)
        cached_price = self.input if self.cached_input is None else self.cached_input
        total = (prompt - cached) * self.input + cached * cached_price + completion * self.output
        return total / PER_MTOK


def parse_price(raw: dict[str, Any], where: str, default: Price | None = None) -> Price | None:
    """The price `raw` gives (its FIELDS), over `default` field by field; None when neither
    sets any. Raises ValueError naming the field for a value that is not a number from 0 to
    MAX_PRICE."""
    given = {name: raw[name] for name in FIELDS if name in raw}
    if not given:
        return default
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where} {name} must be a number (USD per million tokens)")
        if not math.isfinite(value) or not 0 <= value <= MAX_PRICE:
            raise ValueError(f"{where} {name} must be between 0 and {MAX_PRICE:g}")
    base = default or Price()
    return Price(
        float(given.get("input_per_mtok", base.input)),
        float(given.get("output_per_mtok", base.output)),
        float(given["cached_input_per_mtok"])
        if "cached_input_per_mtok" in given
        else base.cached_input,
    )


def of_request(
    price: Price | None,
    prompt: int | None,
    completion: int | None,
    cached: int | None,
    from_cache: bool,
) -> float | None:
    """A request's cost: 0 when the response cache answered it, None without a price or a
    reported usage, else its usage at `price`."""
    if from_cache:
        return 0.0
    if price is None or (prompt is None and completion is None):
        return None
    return price.cost(prompt or 0, completion or 0, cached or 0)


def header_value(usd: float) -> str:
    """The `x-edge-cost-usd` header's text: fixed point, to a millionth of a cent."""
    return f"{usd:.8f}"
