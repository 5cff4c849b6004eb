"""Industrial-like synthetic CTR data with textual behaviour sequences (bills, searches, app visits).

What BAHE exploits, reproduced on purpose: a small set of DISTINCT behaviour texts ("Purchase at Latte
House 12.50 CNY ...") recurs, Zipf-distributed, across many users' sequences, so each distinct text
only needs encoding once.

The hidden world (:func:`build_world`, deterministic under ``config.seed``):

* ``num_topics`` hidden topics, each with its own vocabulary of 10 words (hand-written themes such as
  coffee / travel / pets for the first 20 topics, pseudo-words after that). Vocabularies are disjoint,
  so a text's topic is readable from its words, but no id or categorical column carries it.
* per sequence type: ``distinct_behaviours`` (H) unique texts, text ``j`` having popularity rank ``j``
  and one topic; per item: a title with topic words and a topic. ``item_category`` is unrelated noise.
* per user: a stable interest topic, an activity level and a segment.

Each sample (one impression), all drawn vectorised per chunk:

1. a user (Zipf over activity); the sample's interest topic is the user's topic with probability
   ``interest_stickiness``, otherwise uniformly random (interests vary per sample);
2. the item: from the interest topic with probability ``relevant_impressions`` (popular-first inside
   the topic), otherwise from the global popularity Zipf;
3. each sequence ``seq_<type>``: length uniform in ``[min_behaviours_per_sequence, M]`` (0 = empty),
   each behaviour from the interest topic with probability ``topic_affinity`` (Zipf over that topic's
   texts), otherwise from the global Zipf over all H texts of the type;
4. the PLANTED RULE for the label::

       match = (# behaviours, all types, whose topic == item topic) / max(# behaviours, 1)
       logit = -2.5 + signal_strength * match + item_bias + 0.25 * z(user activity) + N(0, 0.5^2)
       label ~ Bernoulli(sigmoid(logit))

   ``item_bias ~ N(0, 0.5^2)`` per item is what an id-only model can learn; the ``match`` term is only
   visible to a model that reads the behaviour texts next to the item title.

Output chunks depend on ``chunk_rows`` (one random stream per chunk) but never on anything else.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from bahe.ctr_data.parquet_io import SampleWriter
from bahe.ctr_data.schema import SampleSchema

_THEMES = """coffee: latte espresso mocha cappuccino barista arabica roast brew americano macchiato
travel: flights hotel airport luggage passport resort cruise itinerary visa boarding
fitness: gym yoga treadmill dumbbell protein pilates marathon workout kettlebell stretching
electronics: smartphone laptop charger earbuds tablet monitor keyboard router headset smartwatch
books: novel paperback bestseller author library poetry memoir ebook bookstore chapter
gaming: console controller esports arcade joystick gamepad quest multiplayer leaderboard respawn
beauty: lipstick skincare serum moisturizer mascara perfume salon manicure cleanser sunscreen
pets: puppy kitten leash aquarium veterinary catnip kibble grooming hamster birdseed
baby: diapers stroller formula pacifier crib onesie teether babysitter nursery rattle
finance: stocks dividend mortgage savings insurance pension bonds brokerage annuity forex
food: noodles dumplings hotpot sushi takeaway pizza burger barbecue bakery dessert
music: concert guitar piano vinyl playlist karaoke violin headphones orchestra album
movies: cinema blockbuster popcorn trailer premiere documentary screening matinee director sequel
fashion: sneakers handbag jeans jacket scarf sunglasses dress boutique tailor wardrobe
home: sofa curtains mattress lamp furniture cookware blender vacuum carpet bedding
auto: tires gasoline carwash dashcam mechanic parking garage motorbike windshield sedan
health: pharmacy vitamins clinic dentist checkup pediatrician ointment bandage thermometer allergy
education: tutoring exam lecture classroom textbook scholarship homework seminar diploma whiteboard
sports: football basketball tennis badminton stadium jersey racket swimming cycling skiing
groceries: vegetables fruit milk eggs rice tofu cereal yogurt butter seafood"""
_THEME_WORDS = [line.split(":")[1].split() for line in _THEMES.splitlines()]
_WORDS_PER_TOPIC = 10
_LISTS = """filler: today online order payment service account member weekly offer record daily reward points receipt update
merchant: Store Shop House Mart Center Outlet Studio Express Corner Plaza
app: Pass Hub Go Plus Mall Club Helper Now Pay Lite
modifier: cheap best nearby discount new used fast local popular reliable
city: Shanghai Beijing Hangzhou Shenzhen Chengdu Guangzhou Wuhan Nanjing Xiamen Suzhou
title_adj: Deluxe Classic Essential Ultimate Signature Starter Family Limited Original Smart
title_noun: Bundle Set Kit Pack Edition Collection Voucher Deal Box Gift"""
_WORDS = {line.split(":")[0]: line.split(":")[1].split() for line in _LISTS.splitlines()}
_FILLER, _MERCHANT, _APP, _MODIFIER, _CITY, _TITLE_ADJ, _TITLE_NOUN = _WORDS.values()

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_BASE_LOGIT, _ITEM_BIAS_STD, _ACTIVITY_WEIGHT, _LOGIT_NOISE = -2.5, 0.5, 0.25, 0.5
_USER_ZIPF, _ITEM_ZIPF, _ACTIVITY_NOISE = 0.7, 0.9, 0.3
_NUM_SEGMENTS, _NUM_CATEGORIES = 10, 50
_START_TIME = 1_700_000_000
_MAX_LIST_BYTES = 2**31 - 1  # one Arrow string array per sequence column and chunk


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of a synthetic dataset; every field is checked on construction.

    Args:
        num_users, num_items, num_samples: population sizes and number of rows to generate.
        sequence_types: the behaviour sequence names N (``seq_<name>`` columns); "bill", "search" and
            "app_visit" get their own text templates, other names a generic one.
        behaviours_per_sequence: M, the longest sequence; lengths are uniform in
            ``[min_behaviours_per_sequence, M]`` per sample and type (0 = an empty sequence).
        tokens_per_behaviour: K, the approximate number of words per behaviour text.
        distinct_behaviours: H, the number of distinct texts PER SEQUENCE TYPE (N * H in total).
        zipf_exponent: popularity skew of behaviour texts (0 = uniform; ~1.1 industrial-like).
        num_topics: hidden topics (2..1000); must not exceed H or num_items.
        topic_affinity: fraction of behaviours drawn from the sample's interest topic.
        interest_stickiness: probability that a sample's interest is its user's stable topic.
        relevant_impressions: probability that the shown item comes from the interest topic.
        signal_strength: weight of the behaviour/item topic match in the click logit.
        seed: the one source of randomness (the same config gives byte-identical output).
        chunk_rows: rows per generated table (streaming; memory grows with it).
    """

    num_users: int = 50_000
    num_items: int = 5_000
    num_samples: int = 100_000
    sequence_types: tuple[str, ...] = ("bill", "search", "app_visit")
    behaviours_per_sequence: int = 20
    min_behaviours_per_sequence: int = 0
    tokens_per_behaviour: int = 12
    distinct_behaviours: int = 5_000
    zipf_exponent: float = 1.1
    num_topics: int = 20
    topic_affinity: float = 0.5
    interest_stickiness: float = 0.5
    relevant_impressions: float = 0.35
    signal_strength: float = 6.0
    seed: int = 0
    chunk_rows: int = 65_536

    def __post_init__(self) -> None:
        object.__setattr__(self, "sequence_types", tuple(self.sequence_types))
        ints = {"num_users": (1, 10**8), "num_items": (1, 10**7), "num_samples": (0, 10**10),
                "behaviours_per_sequence": (1, 10_000), "min_behaviours_per_sequence": (0, 10_000),
                "tokens_per_behaviour": (1, 512), "distinct_behaviours": (1, 10**7),
                "num_topics": (2, 1000), "seed": (0, 2**63 - 1), "chunk_rows": (1, 10**7)}
        for name, (lo, hi) in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
                raise ValueError(f"SyntheticConfig.{name}={value!r}: set it to an integer in [{lo}, {hi}]")
            object.__setattr__(self, name, int(value))  # plain int: the config goes into JSON metadata
        floats = {"zipf_exponent": (0.0, 5.0), "topic_affinity": (0.0, 1.0), "interest_stickiness": (0.0, 1.0),
                  "relevant_impressions": (0.0, 1.0), "signal_strength": (0.0, 50.0)}
        for name, (lo, hi) in floats.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not lo <= value <= hi:
                raise ValueError(f"SyntheticConfig.{name}={value!r}: set it to a number in [{lo}, {hi}]")
            object.__setattr__(self, name, float(value))
        if not 1 <= len(self.sequence_types) <= 16:
            raise ValueError(f"SyntheticConfig.sequence_types={self.sequence_types!r}: give 1 to 16 names")
        for name in self.sequence_types:
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"SyntheticConfig.sequence_types: name {name!r} must be lower-case letters, "
                                 "digits and underscores, starting with a letter")
        if len(set(self.sequence_types)) != len(self.sequence_types):
            raise ValueError(f"SyntheticConfig.sequence_types={self.sequence_types!r}: names must be unique")
        if self.min_behaviours_per_sequence > self.behaviours_per_sequence:
            raise ValueError(f"SyntheticConfig.min_behaviours_per_sequence={self.min_behaviours_per_sequence}: "
                             f"set it to an integer in [0, behaviours_per_sequence={self.behaviours_per_sequence}]")
        for name in ("distinct_behaviours", "num_items"):
            if getattr(self, name) < self.num_topics:
                raise ValueError(f"SyntheticConfig.{name}={getattr(self, name)}: set it to at least "
                                 f"num_topics={self.num_topics} (every topic needs one), or lower num_topics")
        worst = self.chunk_rows * self.behaviours_per_sequence * (10 * self.tokens_per_behaviour + 40)
        if worst > _MAX_LIST_BYTES:
            limit = _MAX_LIST_BYTES // (self.behaviours_per_sequence * (10 * self.tokens_per_behaviour + 40))
            raise ValueError(f"SyntheticConfig.chunk_rows={self.chunk_rows}: one chunk's texts may exceed 2 GiB "
                             f"with M={self.behaviours_per_sequence}, K={self.tokens_per_behaviour}; "
                             f"set it to an integer in [1, {limit}]")


class _TopicSampler:
    """Zipf draws over a ranked population, globally or restricted to one topic, via one searchsorted.

    Member ``i`` (rank ``i``, most popular first) has weight ``(i + 1) ** -exponent``. Inside topic
    ``t`` the members keep their relative order and are re-weighted by their rank within the topic.
    """

    def __init__(self, topics: np.ndarray, num_topics: int, exponent: float):
        size = len(topics)
        weights = np.arange(1, size + 1, dtype=np.float64) ** -exponent
        self.global_cdf = np.cumsum(weights) / weights.sum()
        self.order = np.argsort(topics, kind="stable")  # members grouped by topic, rank order inside
        counts = np.bincount(topics, minlength=num_topics)
        self.end = np.cumsum(counts)
        self.start = self.end - counts
        rank_in_topic = np.arange(size) - np.repeat(self.start, counts)
        w = (rank_in_topic + 1.0) ** -exponent
        cum = np.cumsum(w)
        before = np.concatenate([[0.0], cum])[self.start]
        totals = np.repeat(cum[self.end - 1] - before, counts)
        self.topic_cdf = np.repeat(np.arange(num_topics, dtype=np.float64), counts) + \
            (cum - np.repeat(before, counts)) / totals

    def draw(self, rng: np.random.Generator, topics: np.ndarray | None, size: int) -> np.ndarray:
        """``size`` member indices; from the global Zipf, or one from topic ``topics[i]`` each."""
        u = np.minimum(rng.random(size), 1.0 - 1e-9)
        if topics is None:
            return np.minimum(np.searchsorted(self.global_cdf, u, side="right"), len(self.order) - 1)
        pos = np.searchsorted(self.topic_cdf, topics + u, side="right")
        return self.order[np.clip(pos, self.start[topics], self.end[topics] - 1)]

    def mixed(self, rng: np.random.Generator, topics: np.ndarray, p_topic: float) -> np.ndarray:
        """One draw per entry of ``topics``: in-topic with probability ``p_topic``, else global."""
        in_topic = rng.random(len(topics)) < p_topic
        out = np.empty(len(topics), dtype=np.int64)
        out[in_topic] = self.draw(rng, topics[in_topic], int(in_topic.sum()))
        out[~in_topic] = self.draw(rng, None, int((~in_topic).sum()))
        return out


@dataclass(frozen=True)
class SyntheticWorld:
    """The hidden world behind a config (deterministic under its seed).

    Attributes:
        topic_words: (T, 10) lower-case words of each topic's vocabulary (disjoint between topics).
        texts: per sequence type, the H distinct behaviour texts, index = popularity rank.
        text_topics: per sequence type, (H,) int64 hidden topic of each text.
        item_titles: (num_items,) title of the item at each popularity rank.
        item_topics, item_ids, item_bias: (num_items,) hidden topic, public id, hidden click bias.
        user_topics, user_ids: (num_users,) stable interest topic and public id per activity rank.
    """

    topic_words: list[list[str]]
    texts: dict[str, list[str]]
    text_topics: dict[str, np.ndarray]
    item_titles: list[str]
    item_topics: np.ndarray
    item_ids: np.ndarray
    item_bias: np.ndarray
    item_category: np.ndarray
    item_popularity: np.ndarray
    user_topics: np.ndarray
    user_ids: np.ndarray
    user_segment: np.ndarray
    user_activity: np.ndarray
    text_arrays: dict[str, pa.Array]
    title_array: pa.Array
    text_samplers: dict[str, _TopicSampler]
    item_sampler: _TopicSampler
    user_cdf: np.ndarray
    activity_scale: float


def _topic_words(num_topics: int, rng: np.random.Generator) -> list[list[str]]:
    words = [list(w) for w in _THEME_WORDS[:num_topics]]
    seen = {w for ws in _THEME_WORDS for w in ws}
    consonants, vowels = list("bdfgklmnprstvz"), list("aeiou")
    while len(words) < num_topics:  # pseudo-words for topics beyond the hand-written themes
        topic: list[str] = []
        while len(topic) < _WORDS_PER_TOPIC:
            n = int(rng.integers(2, 4))
            word = "".join(c + v for c, v in zip(rng.choice(consonants, n), rng.choice(vowels, n)))
            if word not in seen:
                seen.add(word)
                topic.append(word)
        words.append(topic)
    return words


def _behaviour_texts(kind: str, topics: np.ndarray, words: list[list[str]], k: int,
                     rng: np.random.Generator) -> list[str]:
    """H unique texts of sequence type ``kind``: a template, then topic / filler words up to ~K words."""
    h = len(topics)
    pick = rng.integers(0, _WORDS_PER_TOPIC, size=(h, k + 2)).tolist()
    filler = rng.integers(0, len(_FILLER), size=(h, k)).tolist()
    is_topic = (rng.random((h, k)) < 0.6).tolist()
    param = rng.integers(0, 10, size=(h, 2)).tolist()
    amount = np.round(np.exp(rng.uniform(0.0, 8.5, size=h)), 2).tolist()
    label = kind.replace("_", " ").capitalize() + ":"
    texts: list[str] = []
    seen: set[str] = set()
    for j, t in enumerate(topics.tolist()):
        tw, p, a = words[t], pick[j], param[j]
        if kind == "bill":
            head = ["Purchase", "at", tw[p[0]].capitalize(), _MERCHANT[a[0]], f"{amount[j]:.2f}", "CNY"]
        elif kind == "search":
            head = ["Search:", _MODIFIER[a[0]], tw[p[0]], tw[p[1]], "in", _CITY[a[1]]]
        elif kind == "app_visit":
            head = ["Visit", "mini-program", tw[p[0]].capitalize(), _APP[a[0]]]
        else:
            head = [label, tw[p[0]], tw[p[1]]]
        pad = [tw[p[i + 2]] if is_topic[j][i] else _FILLER[filler[j][i]] for i in range(max(0, k - len(head)))]
        text = " ".join(head + pad)
        if text in seen:  # rare: make it unique without changing its topic words
            text = f"{text} #{j}"
        seen.add(text)
        texts.append(text)
    return texts


def build_world(config: SyntheticConfig) -> SyntheticWorld:
    """Draw the hidden topics, distinct texts, items and users of ``config`` (see module docstring)."""
    rng = np.random.default_rng([config.seed, 0])
    t = config.num_topics
    words = _topic_words(t, rng)
    texts, text_topics = {}, {}
    for kind in config.sequence_types:
        topics = rng.permutation(np.arange(config.distinct_behaviours) % t)  # every topic has texts
        text_topics[kind] = topics
        texts[kind] = _behaviour_texts(kind, topics, words, config.tokens_per_behaviour, rng)
    n_items = config.num_items
    item_topics = rng.permutation(np.arange(n_items) % t)
    pick = rng.integers(0, _WORDS_PER_TOPIC, size=(n_items, 2)).tolist()
    adj, noun = rng.integers(0, 10, size=n_items).tolist(), rng.integers(0, 10, size=n_items).tolist()
    titles = [f"{_TITLE_ADJ[adj[i]]} {words[tp][pick[i][0]].capitalize()} {words[tp][pick[i][1]].capitalize()} "
              f"{_TITLE_NOUN[noun[i]]}" for i, tp in enumerate(item_topics.tolist())]
    item_weights = np.arange(1, n_items + 1, dtype=np.float64) ** -_ITEM_ZIPF
    user_weights = np.arange(1, config.num_users + 1, dtype=np.float64) ** -_USER_ZIPF
    log_activity = np.log(user_weights / user_weights.sum() * config.num_users)
    mean_activity = float(np.average(log_activity, weights=user_weights))
    activity_std = float(np.sqrt(np.average((log_activity - mean_activity) ** 2, weights=user_weights)))
    return SyntheticWorld(
        topic_words=words, texts=texts, text_topics=text_topics, item_titles=titles,
        item_topics=item_topics, item_ids=rng.permutation(n_items).astype(np.int64),
        item_bias=rng.normal(0.0, _ITEM_BIAS_STD, n_items),
        item_category=rng.integers(0, _NUM_CATEGORIES, n_items),  # unrelated to the topic on purpose
        item_popularity=np.log(item_weights / item_weights.sum() * n_items).astype(np.float32),
        user_topics=rng.integers(0, t, config.num_users),
        user_ids=rng.permutation(config.num_users).astype(np.int64),
        user_segment=rng.integers(0, _NUM_SEGMENTS, config.num_users),
        user_activity=log_activity - mean_activity,  # centred over sampled rows, not over users
        text_arrays={kind: pa.array(v, pa.string()) for kind, v in texts.items()},
        title_array=pa.array(titles, pa.string()),
        text_samplers={kind: _TopicSampler(tp, t, config.zipf_exponent) for kind, tp in text_topics.items()},
        item_sampler=_TopicSampler(item_topics, t, _ITEM_ZIPF),
        user_cdf=np.cumsum(user_weights) / user_weights.sum(),
        activity_scale=float(np.hypot(activity_std, _ACTIVITY_NOISE)) or 1.0,
    )


def behaviour_vocabulary(config: SyntheticConfig) -> dict[str, list[str]]:
    """Sequence type -> its H distinct behaviour texts (most popular first): the texts to encode once."""
    return build_world(config).texts


def synthetic_schema(config: SyntheticConfig) -> SampleSchema:
    """The sample schema of the generated data, with the config in ``extra["config"]``."""
    return SampleSchema(categorical=("user_segment", "item_category"), dense=("user_activity", "item_popularity"),
                        sequences=config.sequence_types, dataset="synthetic", extra={"config": asdict(config)})


def _one_value_lists(values: np.ndarray) -> pa.ListArray:
    offsets = pa.array(np.arange(len(values) + 1, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.astype(np.int64)))


def _chunk(config: SyntheticConfig, world: SyntheticWorld, rng: np.random.Generator, n: int,
           start_time: int, target: pa.Schema) -> pa.Table:
    """``n`` samples as a table with the exact Arrow schema ``target``."""
    t = config.num_topics
    users = np.minimum(np.searchsorted(world.user_cdf, rng.random(n), side="right"), config.num_users - 1)
    interest = np.where(rng.random(n) < config.interest_stickiness, world.user_topics[users],
                        rng.integers(0, t, n))
    items = world.item_sampler.mixed(rng, interest, config.relevant_impressions)
    item_topic = world.item_topics[items]
    matches, total = np.zeros(n), np.zeros(n)
    sequences = {}
    for kind in config.sequence_types:
        lengths = rng.integers(config.min_behaviours_per_sequence, config.behaviours_per_sequence + 1, n)
        row = np.repeat(np.arange(n), lengths)
        ids = world.text_samplers[kind].mixed(rng, interest[row], config.topic_affinity)
        matches += np.bincount(row, weights=world.text_topics[kind][ids] == item_topic[row], minlength=n)
        total += lengths
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        sequences[kind] = pa.ListArray.from_arrays(pa.array(offsets), world.text_arrays[kind].take(pa.array(ids)))
    activity = world.user_activity[users] + rng.normal(0.0, _ACTIVITY_NOISE, n)
    activity_z = activity / world.activity_scale  # about N(0, 1) over rows
    logit = (_BASE_LOGIT + config.signal_strength * matches / np.maximum(total, 1.0) + world.item_bias[items]
             + _ACTIVITY_WEIGHT * activity_z + rng.normal(0.0, _LOGIT_NOISE, n))
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
    timestamp = start_time + np.cumsum(1 + rng.poisson(3.0, n)).astype(np.int64)
    columns = {
        "label": pa.array(label), "timestamp": pa.array(timestamp),
        "user_id": pa.array(world.user_ids[users]), "item_id": pa.array(world.item_ids[items]),
        "cat_user_segment": _one_value_lists(world.user_segment[users]),
        "cat_item_category": _one_value_lists(world.item_category[items]),
        "dense_user_activity": pa.array(activity.astype(np.float32)),
        "dense_item_popularity": pa.array(world.item_popularity[items]),
        "item_text": world.title_array.take(pa.array(items)),
        **{f"seq_{kind}": arr for kind, arr in sequences.items()},
    }
    return pa.Table.from_arrays([columns[name] for name in target.names], schema=target)


def generate(config: SyntheticConfig) -> Iterator[pa.Table]:
    """Yield the ``config.num_samples`` rows as tables of at most ``chunk_rows`` rows, in time order.

    Each table has exactly ``synthetic_schema(config).arrow_schema()``; timestamps strictly increase
    across the whole stream. The world is built once; every chunk has its own seeded random stream.
    """
    world = build_world(config)
    target = synthetic_schema(config).arrow_schema()
    clock = _START_TIME
    for index, start in enumerate(range(0, config.num_samples, config.chunk_rows)):
        n = min(config.chunk_rows, config.num_samples - start)
        table = _chunk(config, world, np.random.default_rng([config.seed, 1, index]), n, clock, target)
        clock = int(table.column("timestamp")[-1].as_py())
        yield table


def write_synthetic(config: SyntheticConfig, out_path: str | Path) -> int:
    """Generate ``config`` into the sample file ``out_path`` (atomic, validated); returns rows written."""
    with SampleWriter(out_path, synthetic_schema(config)) as writer:
        for table in generate(config):
            writer.write(table)
    return writer.rows_written
