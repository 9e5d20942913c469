"""The ``metadata`` class: PII in captions, JSON sidecars and Parquet columns.

One real analyzer (Presidio + the shipped spaCy pipeline, ~7 s to load) serves the module.
"""

from __future__ import annotations

import json
import pickle
import re

import pytest

from veil.transforms.metadata import MetadataStage, looks_textual
from veil.transforms.textpii import Entity

pytest.importorskip("presidio_analyzer")

PLANTED = ["John Smith", "john.smith@example.com", "212-555-0143", "DE89 3704 0044 0532 0130 00",
           "192.168.1.20", "Alice Johnson", "alice@example.org", "Bob Miller", "7946 0958"]
CAPTION = ("Photo of John Smith at the beach at sunset, contact john.smith@example.com or "
           "+1 212-555-0143.")
META = {"author": "Alice Johnson", "email": "alice@example.org", "width": 640, "licence": "CC-BY",
        "tags": ["beach", "sunset", {"who": "Bob Miller"}],
        "nested": {"phone": "+44 20 7946 0958", "ok": True, "none": None, "ratio": 0.5}}


@pytest.fixture(scope="module")
def redact() -> MetadataStage:
    stage = MetadataStage()
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def keep(redact) -> MetadataStage:
    stage = MetadataStage(policy="keep")
    stage.analyzer = redact.analyzer  # share the loaded engine: one spaCy load per module
    stage._ready = True
    return stage


def tar_sample(**fields: bytes) -> dict:
    return {"__key__": "k", "__image__": "jpg", "__fields__": ("jpg", *fields), "jpg": b"\xff\xd8",
            "status": "pending", **fields}


def assert_no_planted(*texts: str) -> None:
    for text in texts:
        for value in PLANTED:
            assert value not in text


def test_caption_and_json_are_redacted_keeping_words_and_structure(redact):
    [out] = redact.process_batch([tar_sample(txt=CAPTION.encode(), json=json.dumps(META).encode())])
    assert out["status"] == "pending", out.get("reason")
    caption, doc = out["txt"].decode(), json.loads(out["json"])
    assert_no_planted(caption, out["json"].decode())
    assert caption.startswith("Photo of <PERSON> at the beach at sunset, contact <EMAIL_ADDRESS>")
    assert "<PHONE_NUMBER>" in caption
    assert list(doc) == list(META) and list(doc["nested"]) == list(META["nested"])
    assert doc["author"] == "<PERSON>" and doc["email"] == "<EMAIL_ADDRESS>"
    assert doc["tags"] == ["beach", "sunset", {"who": "<PERSON>"}]
    assert doc["nested"] == {**META["nested"], "phone": "<PHONE_NUMBER>"}
    assert (doc["width"], doc["licence"]) == (640, "CC-BY")
    assert out["redactions"] == {"PERSON": 3, "EMAIL_ADDRESS": 2, "PHONE_NUMBER": 2}
    assert out["jpg"] == b"\xff\xd8"


def test_iban_and_ip_address_in_a_caption_field(redact):
    text = "Transfer to IBAN DE89 3704 0044 0532 0130 00 from host 192.168.1.20 today."
    [out] = redact.process_batch([tar_sample(caption=text.encode())])
    assert out["caption"] == b"Transfer to IBAN <IBAN_CODE> from host <IP_ADDRESS> today."
    assert out["redactions"] == {"IBAN_CODE": 1, "IP_ADDRESS": 1}


def test_text_without_pii_is_left_byte_for_byte(redact):
    raw_json = b'{"b":1,  "a": ["red bicycle", "brick wall"]}'
    caption = b"A red bicycle leaning against a brick wall."
    [out] = redact.process_batch([tar_sample(caption=caption, json=raw_json)])
    assert out["caption"] == caption and out["json"] == raw_json
    assert out["redactions"] == {}


def test_repeated_json_keys_and_unicode_survive(redact):
    raw = b'{"note": "cr\\u00e8me br\\u00fbl\\u00e9e", "note": "Call Peter Jones"}'
    [out] = redact.process_batch([tar_sample(json=raw)])
    text = out["json"].decode()
    assert text == '{"note": "crème brûlée", "note": "Call <PERSON>"}'


def test_parquet_row_strings_nested_values_and_bytes(redact):
    row = {"caption": CAPTION, "id": 7, "score": 0.5, "tags": ["sunset", "Alice Johnson"],
           "owner": {"name": "Bob Miller", "year": 2020}, "raw": b"mail alice@example.org",
           "blob": b"\x00\x01\x02", "image": {"bytes": None, "path": "beach.jpg"}}
    sample = {"__key__": "r", "__image__": "jpg", "__fields__": ("jpg",), "jpg": b"x", "__row__": row}
    [out] = redact.process_batch([sample])
    new = out["__row__"]
    assert out.get("status") != "quarantined", out.get("reason")
    assert_no_planted(new["caption"], *new["tags"], new["owner"]["name"], new["raw"].decode())
    assert new["tags"][0] == "sunset" and new["raw"] == b"mail <EMAIL_ADDRESS>"
    assert (new["id"], new["score"], new["owner"]["year"], new["blob"]) == (7, 0.5, 2020, b"\x00\x01\x02")
    assert new["image"] == {"bytes": None, "path": "beach.jpg"}  # not "<URL>g": see _entities
    assert row["caption"] == CAPTION  # the input row is not mutated
    assert out["redactions"] == {"PERSON": 3, "EMAIL_ADDRESS": 2, "PHONE_NUMBER": 1}


@pytest.mark.parametrize(("fields", "why"), [
    ({"txt": b"Photo of \xff\xfe John"}, "is not UTF-8 text"),
    ({"json": b'{"author": "John Smith",}'}, "is not valid JSON"),
    ({"caption": b"John\x00Smith"}, "control characters"),
])
def test_text_that_cannot_be_read_quarantines_the_sample(redact, fields, why):
    [out] = redact.process_batch([tar_sample(**fields)])
    assert out["status"] == "quarantined"
    assert out["reason"].startswith("metadata_error: field ") and why in out["reason"]
    assert_no_planted(out["reason"])
    assert "redactions" not in out


def test_unknown_fields_are_scanned_when_textual_and_passed_when_binary(redact):
    binary = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}"
    [out] = redact.process_batch([tar_sample(npy=binary, meta=b"taken by John Smith")])
    assert out["npy"] == binary and out["meta"] == b"taken by <PERSON>"


def test_fields_limits_the_scan_and_requires_text(redact):
    stage = MetadataStage(fields=["txt", "npy"])
    stage.analyzer, stage._ready = redact.analyzer, True
    [out] = stage.process_batch([tar_sample(txt=b"by John Smith", caption=b"by John Smith")])
    assert out["txt"] == b"by <PERSON>" and out["caption"] == b"by John Smith"
    [out] = stage.process_batch([tar_sample(npy=b"\x93NUMPY\x00")])
    assert out["status"] == "quarantined" and "'npy'" in out["reason"]


def test_keep_policy_only_counts(keep):
    raw_json = json.dumps(META).encode()
    [out] = keep.process_batch([tar_sample(txt=CAPTION.encode(), json=raw_json)])
    assert out["txt"] == CAPTION.encode() and out["json"] == raw_json
    assert out["redactions"] == {"PERSON": 3, "EMAIL_ADDRESS": 2, "PHONE_NUMBER": 2}


def test_counts_never_hold_values_and_add_to_earlier_counts(redact):
    sample = tar_sample(txt=CAPTION.encode())
    sample["redactions"] = {"PERSON": 2, "URL": 1}
    [out] = redact.process_batch([sample])
    assert out["redactions"] == {"PERSON": 3, "URL": 1, "EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1}
    assert all(re.fullmatch(r"[A-Z_]+", k) and isinstance(v, int) for k, v in out["redactions"].items())
    assert_no_planted(json.dumps(out["redactions"]))


def test_pii_in_a_json_key_quarantines_the_sample(redact):
    [out] = redact.process_batch([tar_sample(json=b'{"john.smith@example.com": "yes"}')])
    assert out["status"] == "quarantined"
    assert out["reason"] == "residual_metadata: 1 entities (EMAIL_ADDRESS) left in 'json'"


class _SecondLook:
    """Finds only the first e-mail the first time it reads a text and every e-mail after
    that, as NER can miss a name in one context and find it in the next: what the residual
    check is for."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def setup(self) -> None: ...

    def analyze(self, text: str) -> list[Entity]:
        found = [Entity("EMAIL_ADDRESS", m.start(), m.end(), 1.0) for m in re.finditer(r"\S+@\S+", text)]
        first = text not in self.seen
        self.seen.add(text)
        return found[:1] if first else found


class _Broken(_SecondLook):
    def analyze(self, text: str) -> list[Entity]:
        raise RuntimeError(f"cannot analyze {text}")


def test_entities_left_after_redaction_quarantine_the_sample():
    stage = MetadataStage()
    stage.analyzer, stage._ready = _SecondLook(), True
    [out] = stage.process_batch([tar_sample(txt=b"a@x.io and b@y.io", caption=b"c@z.io")])
    assert out["status"] == "quarantined"
    assert out["reason"] == "residual_metadata: 1 entities (EMAIL_ADDRESS) left in 'txt'"
    assert out["txt"] == b"a@x.io and b@y.io"  # nothing half-written


def test_an_analyzer_error_quarantines_without_the_text():
    stage = MetadataStage()
    stage.analyzer, stage._ready = _Broken(), True
    [out] = stage.process_batch([tar_sample(txt=b"a@x.io")])
    assert out["status"] == "quarantined"
    assert out["reason"] == "metadata_error: analyzer failed (RuntimeError)"


def test_quarantined_samples_pass_untouched(redact):
    sample = {**tar_sample(txt=CAPTION.encode()), "status": "quarantined", "reason": "x"}
    [out] = redact.process_batch([sample])
    assert out["txt"] == CAPTION.encode() and "redactions" not in out


def test_pickles_before_setup_and_checks_its_arguments():
    stage = MetadataStage(policy="keep", entities=["PERSON"], score_threshold=0.5, fields=["txt"])
    clone = pickle.loads(pickle.dumps(stage))
    assert (clone.policy, clone.fields, clone.analyzer.entities) == ("keep", ("txt",), ("PERSON",))
    assert clone.analyzer._engine is None and not clone._ready
    assert (clone.name, clone.resources.cpus) == ("metadata", 0.5)
    with pytest.raises(ValueError, match="policy"):
        MetadataStage(policy="blur")
    with pytest.raises(ValueError, match="score_threshold"):
        MetadataStage(score_threshold=2)
    with pytest.raises(ValueError, match="at least one"):
        MetadataStage(fields=[])


def test_looks_textual():
    assert looks_textual("tabs\tand\nnewlines\r\n") and not looks_textual("nul\x00") and not looks_textual("\x1b[31m")


def test_residual_entities_count_what_a_release_still_holds(redact):
    """Validation's check of released fields: placeholders left by a redaction are not
    entities; planted values are counted by type; a field that is not text raises."""
    from veil.transforms.metadata import MetadataError

    original = tar_sample(txt=CAPTION.encode(), json=json.dumps(META).encode())
    left = redact.residual_entities(dict(original))
    assert left["PERSON"] == 3 and left["EMAIL_ADDRESS"] == 2
    [released] = redact.process_batch([dict(original)])
    assert redact.residual_entities(released) == {}
    row = {"__key__": "r", "__row__": {"caption": "mail ada@example.org", "n": 3}}
    assert redact.residual_entities(row) == {"EMAIL_ADDRESS": 1}
    with pytest.raises(MetadataError, match="not UTF-8"):
        redact.residual_entities(tar_sample(txt=b"\xff\xfe bad"))


def test_the_analyzer_loads_without_importing_transformers():
    """presidio imports transformers' pipelines for an engine Veil does not use (2 s and
    hundreds of MB per worker); Veil's analyzer loads without them, and transformers stays
    importable for the stages that do use it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from veil.transforms.textpii import PIIAnalyzer\n"
        "a = PIIAnalyzer()\n"
        "a.setup()\n"
        "found = [e.type for e in a.analyze('Call Anna Berg at anna.berg@mail.se')]\n"
        "assert 'EMAIL_ADDRESS' in found, found\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "import transformers\n"
        "print('ok', transformers.__version__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")
