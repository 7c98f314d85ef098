#!/usr/bin/env python3
"""A seeded generator of synthetic web-shop clickstream events: the project's test and benchmark data.

Usage::

    python bench/clickstream.py --n 200000 --seed 42 --out clickstream.ndjson

or, imported (``bench/`` on ``sys.path``)::

    from clickstream import events, ndjson_lines
    first = next(events(1, seed=7))

The output is NDJSON: one compact JSON object per line, UTF-8 (a few city names are not ASCII),
each line ending in ``\\n``, about 1 KiB a line. The same ``n`` and ``seed`` give the same bytes on
every run and machine: the only source of randomness is one ``random.Random(seed)``, the clock
is a fixed start instant, and floats are rounded before they are written.

Every event has these keys (the Glue table in ``bench/bench_formats.py`` declares their types)::

    event_id        UUID text                     event_type   page_view, click, purchase, ...
    event_time      "2024-05-01T00:00:03.141Z"    received_at_ms  epoch millis, a little later
    session_id      24 characters                 sequence     the event's index in the file
    user            {user_id, anonymous_id, is_logged_in, segment, ltv_usd}
    device          {type, os, browser, user_agent, screen_w, screen_h, ip}
    geo             {country, city, lat, lon, tz_offset_min}
    page            {url, path, title, load_time_ms}
    tags            a list of 0 to 5 words
    metrics         {scroll_depth, dwell_ms, clicks}

and some have optional ones: ``referrer`` (text), ``ecommerce`` ({currency, items: [{sku, qty,
price, category}], total, coupon}, on every cart and purchase event and a few others),
``experiment`` ({id, variant}) and ``error`` ({code, message}, rare). Money has two decimals.

Events come from visits: a busy shop's ``OPEN_VISITS`` concurrent sessions, each with its user,
device and place, take random turns producing events (a visit that has used its steps is replaced
by a new one), so a session's events share those values, as in a real clickstream, and any 1,000
consecutive events come from several hundred users (what dynamic partitioning by user sees).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

__all__ = ["OPEN_VISITS", "START", "events", "ndjson_lines", "write"]

#: The instant of the first event; later events follow it by tens of milliseconds each.
START = datetime(2024, 5, 1, tzinfo=UTC)
#: Sessions open at any moment; each event comes from one of them, picked at random.
OPEN_VISITS = 2000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)

# (event type, weight) of a step in a visit.
_EVENT_WEIGHTS = (
    ("page_view", 30), ("click", 22), ("scroll", 14), ("search", 8), ("add_to_cart", 7),
    ("video_play", 5), ("form_submit", 4), ("purchase", 3), ("login", 4), ("logout", 3),
)
_EVENT_TYPES = [name for name, _ in _EVENT_WEIGHTS]
_EVENT_CUMULATIVE = [sum(w for _, w in _EVENT_WEIGHTS[: i + 1]) for i in range(len(_EVENT_WEIGHTS))]

# (country, UTC offset in minutes, cities with their approximate coordinates)
_PLACES = (
    ("US", -420, (("Seattle", 47.61, -122.33), ("Denver", 39.74, -104.99))),
    ("US", -240, (("New York", 40.71, -74.01), ("Boston", 42.36, -71.06))),
    ("CA", -240, (("Toronto", 43.65, -79.38), ("Montréal", 45.50, -73.57))),
    ("BR", -180, (("São Paulo", -23.55, -46.63),)),
    ("GB", 60, (("London", 51.51, -0.13), ("Leeds", 53.80, -1.55))),
    ("DE", 120, (("Berlin", 52.52, 13.40), ("Köln", 50.94, 6.96))),
    ("PL", 120, (("Kraków", 50.06, 19.94),)),
    ("CH", 120, (("Zürich", 47.37, 8.54),)),
    ("IN", 330, (("Mumbai", 19.08, 72.88), ("Bengaluru", 12.97, 77.59))),
    ("JP", 540, (("Tokyo", 35.68, 139.69), ("Ōsaka", 34.69, 135.50))),
    ("AU", 600, (("Sydney", -33.87, 151.21),)),
)

# (device type, operating system, browser, user agent, screen sizes)
_DEVICES = (
    ("desktop", "Windows 11", "Chrome",
     "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/125.0.0.0 Safari/537.36", ((1920, 1080), (1366, 768), (2560, 1440))),
    ("desktop", "Windows 11", "Edge",
     "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/125.0.0.0 Safari/537.36 Edg/125.0.2535.51", ((1920, 1080), (1536, 864))),
    ("desktop", "macOS 14.5", "Safari",
     "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.5 Safari/605.1.15", ((1440, 900), (1728, 1117))),
    ("desktop", "Ubuntu 24.04", "Firefox",
     "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0", ((1920, 1080),)),
    ("mobile", "iOS 17.5", "Safari",
     "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.5 Mobile/15E148 Safari/604.1", ((390, 844), (430, 932))),
    ("mobile", "Android 14", "Chrome",
     "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/125.0.6422.53 Mobile Safari/537.36", ((412, 915),)),
    ("mobile", "Android 14", "Samsung Internet",
     "Mozilla/5.0 (Linux; Android 14; SM-S921B) AppleWebKit/537.36 (KHTML, like Gecko) "
     "SamsungBrowser/25.0 Chrome/121.0.0.0 Mobile Safari/537.36", ((384, 832),)),
    ("tablet", "iPadOS 17.5", "Safari",
     "Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.5 Mobile/15E148 Safari/604.1", ((820, 1180), (1024, 1366))),
)

_CATEGORIES = ("books", "garden", "kitchen", "outdoor", "audio", "toys", "shoes", "lighting")
_ADJECTIVES = ("quiet", "compact", "waterproof", "handmade", "refurbished", "solar", "foldable",
               "classic", "bamboo", "wireless", "ceramic", "merino")
_NOUNS = ("lamp", "kettle", "backpack", "speaker", "notebook", "trowel", "sneaker", "blanket",
          "puzzle", "headphones", "planter", "tent")
_SEARCH_TERMS = ("gift ideas", "summer sale", "rain jacket", "usb c cable", "standing desk",
                 "garden hose", "board games", "running shoes")
_REFERRERS = ("https://www.google.com/", "https://duckduckgo.com/", "https://www.bing.com/",
              "https://t.co/", "https://news.example.org/deals", "android-app://com.example.shop")
_SEGMENTS = ("new", "returning", "loyal", "lapsed")
_CURRENCIES = {"US": "USD", "CA": "CAD", "BR": "BRL", "GB": "GBP", "DE": "EUR", "PL": "PLN",
               "CH": "CHF", "IN": "INR", "JP": "JPY", "AU": "AUD"}
_ERRORS = ((404, "page not found"), (500, "internal server error"), (502, "bad gateway from upstream"),
           (429, "too many requests, retry later"), (400, "invalid form field: postal code"))
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass
class _Visit:
    """An open session: who, on what, from where; it produces events until it has used its steps."""

    session_id: str
    user: dict[str, Any]
    device: dict[str, Any]
    geo: dict[str, Any]
    currency: str
    referrer: str | None
    experiment: dict[str, str] | None
    steps_left: int
    cart: list[dict[str, Any]]


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _new_visit(rng: random.Random) -> _Visit:
    country, offset, cities = rng.choice(_PLACES)
    city, lat, lon = rng.choice(cities)
    kind, os_name, browser, agent, screens = rng.choice(_DEVICES)
    width, height = rng.choice(screens)
    logged_in = rng.random() < 0.5
    return _Visit(
        session_id="".join(rng.choice(_ALPHABET) for _ in range(24)),
        user={
            "user_id": rng.randrange(1, 2_000_000),
            "anonymous_id": _uuid(rng),
            "is_logged_in": logged_in,
            "segment": rng.choice(_SEGMENTS),
            "ltv_usd": round(rng.expovariate(1 / 350), 2) if logged_in else 0.0,
        },
        device={
            "type": kind,
            "os": os_name,
            "browser": browser,
            "user_agent": agent,
            "screen_w": width,
            "screen_h": height,
            "ip": f"{rng.randrange(11, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
        },
        geo={
            "country": country,
            "city": city,
            "lat": round(lat + rng.uniform(-0.2, 0.2), 5),
            "lon": round(lon + rng.uniform(-0.2, 0.2), 5),
            "tz_offset_min": offset,
        },
        currency=_CURRENCIES[country],
        referrer=rng.choice(_REFERRERS) if rng.random() < 0.6 else None,
        experiment={"id": f"exp_{rng.randrange(1, 40)}", "variant": rng.choice(("A", "B", "control"))}
        if rng.random() < 0.3
        else None,
        steps_left=rng.randrange(1, 16),
        cart=[],
    )


def _product(rng: random.Random) -> tuple[str, str, str]:
    """(path, title, category) of a product page."""
    category = rng.choice(_CATEGORIES)
    name = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    return f"/p/{category}/{rng.randrange(10_000, 100_000)}", name.title(), category


def _page(rng: random.Random, event_type: str) -> tuple[dict[str, Any], str | None]:
    """The page an event happened on, and the product category when it is a product page."""
    category: str | None = None
    query = ""
    if event_type == "search":
        term = rng.choice(_SEARCH_TERMS)
        path, title, query = "/search", f"Results for {term}", "?q=" + term.replace(" ", "+")
    elif event_type in ("purchase", "form_submit"):
        path, title = rng.choice((("/checkout", "Checkout"), ("/checkout/confirm", "Order Confirmed")))
    elif event_type in ("login", "logout"):
        path, title = "/account", "Your Account"
    elif rng.random() < 0.7:
        path, title, category = _product(rng)
    else:
        category = rng.choice(_CATEGORIES)
        path, title = f"/c/{category}", f"Shop {category.title()}"
    page = {
        "url": "https://shop.example.com" + path + query,
        "path": path,
        "title": title,
        "load_time_ms": round(rng.lognormvariate(5.8, 0.5), 1),
    }
    return page, category


def _ecommerce(rng: random.Random, visit: _Visit, event_type: str, category: str | None) -> dict[str, Any]:
    if event_type == "add_to_cart" or not visit.cart:
        visit.cart.append({
            "sku": f"SKU-{rng.randrange(1_000_000):06d}",
            "qty": rng.randrange(1, 4),
            "price": round(rng.uniform(2, 400), 2),
            "category": category or rng.choice(_CATEGORIES),
        })
    items = [dict(item) for item in visit.cart[-3:]]
    total = round(sum(item["qty"] * item["price"] for item in items), 2)
    return {
        "currency": visit.currency,
        "items": items,
        "total": total,
        "coupon": rng.choice(("WELCOME5", "FREESHIP")) if rng.random() < 0.25 else None,
    }


def _event(rng: random.Random, visit: _Visit, sequence: int, when: datetime) -> dict[str, Any]:
    event_type = rng.choices(_EVENT_TYPES, cum_weights=_EVENT_CUMULATIVE)[0]
    page, category = _page(rng, event_type)
    words = [rng.choice(_ADJECTIVES + _NOUNS) for _ in range(rng.randrange(6))]
    event: dict[str, Any] = {
        "event_id": _uuid(rng),
        "event_type": event_type,
        "event_time": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z",
        "received_at_ms": (when - _EPOCH) // _MILLISECOND + rng.randrange(3, 1500),
        "session_id": visit.session_id,
        "sequence": sequence,
        "user": dict(visit.user),  # copies: a caller may change one event without changing others
        "device": dict(visit.device),
        "geo": dict(visit.geo),
        "page": page,
        "tags": words,
        "metrics": {
            "scroll_depth": round(rng.betavariate(2, 3), 4),
            "dwell_ms": int(rng.expovariate(1 / 20_000)),
            "clicks": rng.randrange(0, 30),
        },
    }
    if visit.referrer is not None:
        event["referrer"] = visit.referrer
    if event_type in ("add_to_cart", "purchase") or rng.random() < 0.08:
        event["ecommerce"] = _ecommerce(rng, visit, event_type, category)
    if visit.experiment is not None:
        event["experiment"] = dict(visit.experiment)
    if rng.random() < 0.02:
        code, message = rng.choice(_ERRORS)
        event["error"] = {"code": code, "message": message}
    return event


def events(n: int, seed: int = 42, *, start: datetime = START) -> Iterator[dict[str, Any]]:
    """``n`` events (dicts), the same for the same ``seed`` and ``start``."""
    rng = random.Random(seed)
    open_visits = [_new_visit(rng) for _ in range(min(n, OPEN_VISITS))]
    when = start
    for sequence in range(n):
        index = rng.randrange(len(open_visits))
        visit = open_visits[index]
        when += timedelta(milliseconds=rng.randrange(1, 80))
        yield _event(rng, visit, sequence, when)
        visit.steps_left -= 1
        if visit.steps_left <= 0:
            open_visits[index] = _new_visit(rng)


def ndjson_lines(n: int, seed: int = 42, *, start: datetime = START) -> Iterator[bytes]:
    """The events as NDJSON lines (compact JSON, UTF-8, each ending in ``\\n``)."""
    for event in events(n, seed, start=start):
        yield json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def write(path: Path, n: int, seed: int = 42) -> int:
    """Write ``n`` events to ``path`` as NDJSON; returns the bytes written."""
    total = 0
    with open(path, "wb") as out:
        for line in ndjson_lines(n, seed):
            out.write(line)
            total += len(line)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="events to write (default 200000)")
    ap.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    ap.add_argument("--out", type=Path, default=Path("clickstream.ndjson"), help="output file")
    args = ap.parse_args(argv)
    if args.n < 0:
        ap.error("--n must be at least 0")
    total = write(args.out, args.n, args.seed)
    average = total / args.n if args.n else 0
    print(f"wrote {args.n} events, {total} bytes ({average:.0f} B/event) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
