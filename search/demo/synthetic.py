"""Synthetic training and probe text for the demo models, generated from a seed.

Two skills that a small model can learn and a merge can combine:
- radiology: chest X-ray findings -> a one-line impression listing the abnormal findings;
- instruction following: a short note on an everyday health topic that obeys IFEval-style
  verifiable instructions (all caps, word limits, keywords, JSON, titles, end phrases).
The text is invented. Instruction prompts use IFEval's own wording, built by lm-eval's
instruction classes, and every generated response is checked by lm-eval's checkers.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from evaluators.probes.ifeval_checks import instruction_description, instruction_results

# ---------------------------------------------------------------- radiology

_NORMAL = [
    "The lungs are clear.",
    "Heart size is normal.",
    "There is no pleural effusion.",
    "There is no pneumothorax.",
    "The mediastinal contours are normal.",
    "The osseous structures are intact.",
    "The trachea is midline.",
    "There is no focal consolidation.",
]
_SIZES = ["small", "moderate", "large"]
_DEGREES = ["mild", "moderate", "severe"]
_SIDES = ["left", "right"]
_LOBES = ["upper", "lower"]
_RIBS = ["fourth", "fifth", "sixth", "seventh"]


def _abnormal(rng: random.Random) -> tuple[str, str, str]:
    """(finding sentence, impression phrase, normal sentence it replaces)."""
    kind = rng.randrange(6)
    side, size, degree = rng.choice(_SIDES), rng.choice(_SIZES), rng.choice(_DEGREES)
    if kind == 0:
        return (f"There is a {size} {side} pleural effusion.",
                f"{size.capitalize()} {side} pleural effusion.", "There is no pleural effusion.")
    if kind == 1:
        lobe = rng.choice(_LOBES)
        return (f"There is patchy opacity in the {side} {lobe} lobe.",
                f"{side.capitalize()} {lobe} lobe opacity, possibly pneumonia.",
                "There is no focal consolidation.")
    if kind == 2:
        return (f"The heart is {degree}ly enlarged.", f"{degree.capitalize()} cardiomegaly.",
                "Heart size is normal.")
    if kind == 3:
        return (f"There is a {size} {side} pneumothorax.",
                f"{size.capitalize()} {side} pneumothorax.", "There is no pneumothorax.")
    if kind == 4:
        return (f"There is {degree} pulmonary edema.", f"{degree.capitalize()} pulmonary edema.",
                "The lungs are clear.")
    rib = rng.choice(_RIBS)
    return (f"There is a healed fracture of the {side} {rib} rib.",
            f"Old {side} {rib} rib fracture.", "The osseous structures are intact.")


def radiology_item(rng: random.Random) -> dict[str, str]:
    findings = rng.sample(_NORMAL, 5)
    impressions = []
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3])):
        sentence, impression, replaces = _abnormal(rng)
        if replaces in findings and impression not in impressions:
            findings[findings.index(replaces)] = sentence
            impressions.append(impression)
    rng.shuffle(findings)
    impression = " ".join(impressions) if impressions else "No acute cardiopulmonary process."
    return {"findings": " ".join(findings), "impression": impression}


RADIOLOGY_PROMPT = "Summarize the radiology findings into a short impression.\nFindings: {findings}"

# ---------------------------------------------------------------- instruction following

TOPICS: dict[str, list[str]] = {
    "sleep": ["Adults need seven to nine hours of sleep.", "A regular bedtime helps the body rest.",
              "Screens before bed can delay sleep."],
    "hydration": ["Water keeps the body cool.", "Thirst is an early sign of dehydration.",
                  "Tea and soup also count toward fluid intake."],
    "walking": ["A daily walk strengthens the heart.", "Thirty minutes of walking lifts the mood.",
                "Good shoes protect the feet on long walks."],
    "vaccines": ["Vaccines train the immune system.", "Flu shots are offered every autumn.",
                 "Most side effects of vaccines pass within a day."],
    "stretching": ["Gentle stretching keeps joints supple.", "Stretch slowly and never bounce.",
                   "Warm muscles stretch more safely."],
    "hand washing": ["Washing hands stops many infections.", "Soap needs twenty seconds to work.",
                     "Dry hands with a clean towel."],
    "breakfast": ["Breakfast gives energy for the morning.", "Oats and fruit make a simple meal.",
                  "Protein at breakfast keeps hunger away."],
    "sun safety": ["Sunscreen protects the skin from burns.", "Midday sun is the strongest.",
                   "Hats and shade lower the risk of skin damage."],
    "stress": ["Slow breathing calms the nervous system.", "Short breaks reduce stress at work.",
               "Talking with friends eases worry."],
    "posture": ["Good posture protects the back.", "Screens should sit at eye level.",
                "Standing up every hour helps the spine."],
    "vegetables": ["Vegetables provide fiber and vitamins.", "Half the plate should be vegetables.",
                   "Frozen vegetables keep their nutrients."],
    "reading": ["Reading before bed relaxes the mind.", "Large print eases eye strain.",
                "Reading aloud helps children learn words."],
    "cycling": ["Cycling builds leg strength.", "A helmet protects the head in a fall.",
                "Cycling to work saves time and money."],
    "allergies": ["Pollen counts peak in spring.", "Antihistamines ease sneezing.",
                  "Closed windows keep pollen outside."],
    "dental care": ["Brush teeth twice a day.", "Floss removes food between teeth.",
                    "A dentist visit each year finds problems early."],
    "hearing": ["Loud music can damage hearing.", "Ear plugs protect the ears at concerts.",
                "Hearing tests are quick and painless."],
    "cooking": ["Home cooking uses less salt.", "Steaming keeps vegetables crisp.",
                "Clean boards prevent food poisoning."],
    "swimming": ["Swimming works every muscle.", "Water supports the joints during exercise.",
                 "Children should swim with an adult nearby."],
}
KEYWORDS = ["health", "energy", "habit", "doctor", "family", "routine", "balance", "safety",
            "morning", "evening", "friends", "comfort"]
END_PHRASES = ["Is there anything else I can help with?", "Let me know if you have questions."]
NOTE_KINDS = ["Write a short note about {topic}.", "Tell me about {topic}.",
              "Give some advice on {topic}.", "Explain why {topic} is important."]

# Instruction ids the demo teaches, and pairs that cannot hold together in one response.
INSTRUCTIONS = [
    "change_case:english_capital", "change_case:english_lowercase",
    "length_constraints:number_words", "keywords:existence", "detectable_format:json_format",
    "startend:end_checker", "detectable_format:title", "startend:quotation",
]
_GROUPS = {
    "change_case:english_capital": "case", "change_case:english_lowercase": "case",
    "detectable_format:json_format": "wrap", "startend:quotation": "wrap",
    "startend:end_checker": "end", "detectable_format:title": "title",
    "length_constraints:number_words": "length", "keywords:existence": "keywords",
}
_CONFLICTS = {frozenset(p) for p in [("case", "end"), ("wrap", "end"), ("wrap", "title"),
                                     ("case", "keywords"), ("length", "title")]}


def _kwargs(instruction_id: str, rng: random.Random) -> dict:
    if instruction_id == "length_constraints:number_words":
        return {"relation": "less than", "num_words": rng.choice([12, 15, 20])}
    if instruction_id == "keywords:existence":
        return {"keywords": rng.sample(KEYWORDS, 2)}
    if instruction_id == "startend:end_checker":
        return {"end_phrase": rng.choice(END_PHRASES)}
    return {}


def _compatible(first: str, second: str) -> bool:
    a, b = _GROUPS[first], _GROUPS[second]
    return a != b and frozenset((a, b)) not in _CONFLICTS


def _respond(topic: str, facts: list[str], ids: list[str], kwargs: list[dict]) -> str:
    sentences = list(facts)
    title = ""
    end = ""
    for instruction_id, kw in zip(ids, kwargs, strict=True):
        if instruction_id == "keywords:existence":
            sentences.append(f"Remember {kw['keywords'][0]} and {kw['keywords'][1]}.")
        elif instruction_id == "length_constraints:number_words":
            sentences = sentences[:1]
        elif instruction_id == "detectable_format:title":
            title = f"<<{topic.title()}>>\n"
        elif instruction_id == "startend:end_checker":
            end = " " + kw["end_phrase"]
    text = title + " ".join(sentences) + end
    for instruction_id in ids:
        if instruction_id == "change_case:english_capital":
            text = text.upper()
        elif instruction_id == "change_case:english_lowercase":
            text = text.lower()
        elif instruction_id == "detectable_format:json_format":
            text = json.dumps({"topic": topic, "note": text})
        elif instruction_id == "startend:quotation":
            text = f'"{text}"'
    return text


def instruction_item(rng: random.Random) -> dict:
    """An IFEval-format item with a response that lm-eval's checkers accept. Drafts that a
    checker rejects (langdetect does not always see two short sentences as English) are
    drawn again."""
    while True:
        item = _instruction_draft(rng)
        if all(instruction_results(item, item["response"])["inst_level_strict_acc"]):
            return item


def _instruction_draft(rng: random.Random) -> dict:
    topic = rng.choice(sorted(TOPICS))
    first = rng.choice(INSTRUCTIONS)
    ids = [first]
    if rng.random() < 0.5:
        ids.append(rng.choice([i for i in INSTRUCTIONS if _compatible(first, i)]))
    kwargs = [_kwargs(i, rng) for i in ids]
    facts = rng.sample(TOPICS[topic], 2)
    task = rng.choice(NOTE_KINDS).format(topic=topic)
    prompt = " ".join([task, *(instruction_description(i, kw) for i, kw in zip(ids, kwargs,
                                                                          strict=True))])
    response = _respond(topic, facts, ids, kwargs)
    return {"prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs, "response": response}


@dataclass(frozen=True)
class Example:
    """One chat turn to train on."""

    prompt: str
    response: str


def radiology_example(rng: random.Random) -> Example:
    item = radiology_item(rng)
    return Example(RADIOLOGY_PROMPT.format(**item), item["impression"])


def instruction_example(rng: random.Random) -> Example:
    item = instruction_item(rng)
    return Example(item["prompt"], item["response"])


def general_example(rng: random.Random) -> Example:
    """Pretraining chat: the domains' sentences, without either task's input -> output
    mapping (no impressions, no verifiable instructions)."""
    if rng.random() < 0.5:
        findings = rng.sample(_NORMAL, rng.randint(1, 3)) + [_abnormal(rng)[0]]
        rng.shuffle(findings)
        return Example("Describe a chest X-ray.", " ".join(findings))
    topic = rng.choice(sorted(TOPICS))
    facts = rng.sample(TOPICS[topic], rng.randint(1, 3))
    return Example(rng.choice(NOTE_KINDS).format(topic=topic), " ".join(facts))
