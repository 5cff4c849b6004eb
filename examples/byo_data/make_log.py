"""Writes the made-up shop log of docs/byo_data.md: items.csv, events.csv, impressions.csv (seeded; run it
again and the files come out byte for byte the same). Nothing here is real data.

    python examples/byo_data/make_log.py
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
START = 1_767_225_600  # 2026-01-01 00:00 UTC
CATEGORIES = {
    "shoes": ["running shoe", "trail shoe", "hiking boot", "sandal"],
    "jackets": ["rain jacket", "down jacket", "fleece", "wind shell"],
    "tents": ["two-person tent", "ultralight tarp", "family tent", "bivy bag"],
    "bikes": ["gravel bike", "city bike", "bike light", "bike lock"],
    "kitchen": ["camping stove", "titanium mug", "water filter", "cook set"],
}
BRANDS = ["Northpeak", "Fjellmark"]


def main() -> None:
    rng = random.Random(7)
    items = []  # (item id, title, category)
    for category, kinds in CATEGORIES.items():
        for kind in kinds:
            for brand in BRANDS:
                items.append((len(items) + 1, f"{brand} {kind}", category))
    users = [f"u{n:03d}" for n in range(1, 31)]
    favourite = {u: rng.choice(list(CATEGORIES)) for u in users}
    device = {u: rng.choice(["mobile", "desktop", "tablet"]) for u in users}
    price = {item: round(rng.uniform(9, 900), 2) for item, _, _ in items}

    def pick(user: str) -> tuple:
        fav = [i for i in items if i[2] == favourite[user]]
        return rng.choice(fav) if rng.random() < 0.6 else rng.choice(items)

    events, impressions = [], []
    t = START
    while len(impressions) < 300:
        t += rng.randint(60, 7200)
        user = rng.choice(users)
        item = pick(user)
        if rng.random() < 0.55:
            events.append((user, item[0], t, "click" if rng.random() < 0.35 else "view"))
            continue
        liked = item[2] == favourite[user]
        clicked = int(rng.random() < (0.55 if liked else 0.12))
        searches = "|".join(rng.choice(CATEGORIES[favourite[user]]) for _ in range(rng.randint(0, 3)))
        impressions.append((t, user, item[0], clicked, device[user], price[item[0]], searches))

    with open(HERE / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item", "title", "category"])
        w.writerows(items)
    with open(HERE / "events.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "ts", "action"])
        w.writerows(events)
    with open(HERE / "impressions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "user", "item", "clicked", "device", "price", "recent_searches"])
        w.writerows(impressions)


if __name__ == "__main__":
    main()
