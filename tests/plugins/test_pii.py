"""pii_redact: every detector on a small document (exact output), what is left alone, the
kinds check, and the stage's counts and resume."""
from __future__ import annotations

import pytest

from recipe_engine import Artifact, RecipeError
from recipe_engine.artifacts import iter_documents, list_parts, write_documents
from recipe_engine.testing import run_stage
from recipe_engine_plugins.data.pii import KINDS, PiiRedact, entropy

REDACT = PiiRedact().redactor()

PEM_BODY = "\n".join(["MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun",
                      "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK",
                      "LxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW/VDL5AaWTg0nLVkjRo"])

CASES = [  # (kind, text, redacted text)
    ("email", "# Author: Jane Doe <jane.doe@mail.example.org>\n",
     "# Author: Jane Doe <<EMAIL>>\n"),
    ("email", "contact: a.b+tag@sub.example.co.uk.", "contact: <EMAIL>."),
    ("ip_address", 'HOST = "93.184.216.34:8080"\n', 'HOST = "<IP_ADDRESS>:8080"\n'),
    ("ip_address", "dns server 1.2.3.4\n", "dns server <IP_ADDRESS>\n"),  # version-like, but DNS
    ("ip_address", "addr = '2606:2800:220:1:248:1893:25c8:1946'",
     "addr = '<IP_ADDRESS>'"),
    ("phone", "Call +44 20 7946 0958 or +1 (415) 555-0132.",
     "Call <PHONE> or <PHONE>."),
    ("phone", "US office: (415) 555-0132, fax 415-555-0199; +4915112345678",
     "US office: <PHONE>, fax <PHONE>; <PHONE>"),
    ("aws_access_key", 'aws_id = "AKIAIOSFODNN7EXAMPLE"\n', 'aws_id = "<KEY>"\n'),
    ("api_token", "GH = 'ghp_" + "a1B2c3D4e5" * 3 + "F6g7h8'\n", "GH = '<KEY>'\n"),
    ("api_token", "github_pat_11ABCDEFG0123456789abcd_" + "x9Y8" * 14 + "zz\n", "<KEY>\n"),
    ("api_token", "slack xoxb-1234567890-0987654321098-AbCdEfGhIjKlMnOpQrStUvWx end",
     "slack <KEY> end"),
    ("api_token", "openai sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t and sk-abc", "openai <KEY> and sk-abc"),
    ("api_token", "maps AIzaSyD4-x9Kq2Lm7Np0Rs3Tu6Vw9Xy1Za4Bc7D", "maps <KEY>"),
    ("private_key",
     f"KEY = '''-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----'''\n",
     "KEY = '''<KEY>'''\n"),
    ("private_key",  # pasted into one string literal with \n escapes
     '"-----BEGIN PRIVATE KEY-----\\n' + PEM_BODY.replace("\n", "\\n")
     + '\\n-----END PRIVATE KEY-----\\n"', '"<KEY>\\n"'),
    ("jwt", "Authorization: eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
            "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U\n", "Authorization: <KEY>\n"),
    ("assigned_secret", 'api_key = "a8F3kL9qZ2xV7mN4pR6t"\n', 'api_key = "<KEY>"\n'),
    ("assigned_secret", '{"clientSecret": "Zk39sLq0Xv82Nb71Mc64", "name": "demo"}',
     '{"clientSecret": "<KEY>", "name": "demo"}'),
    ("assigned_secret", "headers['Authorization'] = 'Bearer 9fK2mQ7xL4pZ8rT1vB6n'",
     "headers['Authorization'] = 'Bearer <KEY>'"),
    ("assigned_secret", "export DB_PASSWORD=s3cr3tP4ssw0rdXyZq\nOTHER=1\n",
     "export DB_PASSWORD=<KEY>\nOTHER=1\n"),
]


@pytest.mark.parametrize("kind,text,want", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_kind_is_replaced(kind, text, want):
    new, counts = REDACT.redact(text)
    assert new == want
    assert set(counts) == {kind}
    # and only that detector is needed
    alone, _ = PiiRedact(kinds=[kind]).redactor().redact(text)
    assert alone == want


CLEAN = [
    '__version__ = "1.2.3.4"\nVERSION = (1, 2, 3)\n',  # version-like quads stay
    "release = '12.34.56.78'  # version of the schema\n",
    "OID = '1.3.6.1.4.1.311.21.20'\n",  # an OID is not an address
    "private = ['10.0.0.1', '192.168.1.20', '127.0.0.1', '0.0.0.0', '::1', 'fe80::1']\n",
    "docs = ['192.0.2.1', '2001:db8::8'] ; dns = ['8.8.8.8', '1.1.1.1', '2001:4860:4860::8888']\n",
    "MASK = 0xDEADBEEF12345678\nH = 'd41d8cd98f00b204e9800998ecf8427e'\n",  # hex constants
    "y = x@self.weight.T\n@property\ndef f(self): return a[1::2], b[::-1], std::vector\n",
    "t = '12:30:45'; mac = '52:54:00:9d:0e:67'; d = '2023-10-05'\n",
    "n = 1234567890; pi = 3.141592653589793; r = (415, 555, 1234); v = +1.5\n",
    "key = 'Content-Type'; token = tokenize.generate_tokens; password = input('pw: ')\n",
    "monkey = 'a8F3kL9qZ2xV7mN4pR6t'  # not a secret name\n",  # the name decides
    "api_key = 'aaaaaaaa11111111'  # too little entropy\n",
    'BEGIN = "-----BEGIN PRIVATE KEY-----"\nEND = "-----END PRIVATE KEY-----"\n',
    "sk-learn-and-some-long-words-here; sk-Some-Hyphenated-Name-2024; ghp_short\n",
]


@pytest.mark.parametrize("text", CLEAN)
def test_text_without_pii_is_untouched(text):
    assert REDACT.redact(text) == (text, {})


def test_rules_are_parameters():
    text = 'password = "Tr0ub4dor&3xyzzy!"\n'
    assert entropy("aaaa") == 0.0 and entropy("abcd") == 2.0
    assert REDACT.redact(text)[0] == 'password = "<KEY>"\n'
    strict = PiiRedact(entropy_threshold=4.5).redactor()
    assert strict.redact(text) == (text, {})
    longer = PiiRedact(min_secret_length=20).redactor()
    assert longer.redact(text) == (text, {})
    named = PiiRedact(placeholders={"email": "[email]", "assigned_secret": ""}).redactor()
    assert named.redact("x@example.com " + text) == ('[email] password = ""\n',
                                                     {"email": 1, "assigned_secret": 1})
    only = PiiRedact(kinds=["phone"]).redactor()
    assert only.redact("a@b.org 415-555-0132") == ("a@b.org <PHONE>", {"phone": 1})


def test_overlaps_go_to_the_earlier_kind():
    jwt = "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    text = f'token = "{jwt}"; mail = "ops@93.184.216.34.example.com"\n'
    new, counts = REDACT.redact(text)
    assert new == 'token = "<KEY>"; mail = "<EMAIL>"\n'
    assert counts == {"jwt": 1, "email": 1}


def test_kinds_and_placeholders_are_checked():
    with pytest.raises(RecipeError, match=r'unknown kind .emial. \(did you mean "email"\?\)'):
        PiiRedact(kinds=["email", "emial"])
    with pytest.raises(RecipeError, match="kinds: is empty"):
        PiiRedact(kinds=[])
    with pytest.raises(RecipeError, match=r'placeholders: unknown kind .phones.'):
        PiiRedact(placeholders={"phones": "<P>"})
    with pytest.raises(RecipeError, match="min_secret_length"):
        PiiRedact(min_secret_length=4)
    assert list(KINDS) == PiiRedact().kinds


def documents(tmp, parts):
    tmp.mkdir(parents=True, exist_ok=True)
    for i, texts in enumerate(parts):
        write_documents(tmp / f"part-{i:05d}.jsonl.zst", [
            {"id": f"d{i}-{j}", "text": t, "source": "t", "path": None, "extra": j}
            for j, t in enumerate(texts)])
    return Artifact(kind="documents", path=tmp, manifest={})


def test_stage_counts_per_kind_and_keeps_clean_documents(tmp_path):
    clean = CLEAN[0]
    inp = documents(tmp_path / "in", [
        [CASES[0][1], clean, CASES[2][1] + CASES[5][1]],
        [clean + CASES[7][1], CASES[16][1]],
    ])
    art = run_stage(PiiRedact(), tmp_path / "run", inputs={"documents": inp})
    docs = list(iter_documents(art.path))
    source = list(iter_documents(inp.path))
    assert [d["text"] for d in docs] == [CASES[0][2], clean, CASES[2][2] + CASES[5][2],
                                         clean + CASES[7][2], CASES[16][2]]
    assert docs[1] == source[1]  # untouched, other fields included
    assert [d["extra"] for d in docs] == [0, 1, 2, 0, 1]
    c = art.manifest["counts"]
    assert {k: v for k, v in c.items() if k.startswith("pii.")} == {
        "pii.email": 1, "pii.ip_address": 1, "pii.phone": 2, "pii.aws_access_key": 1,
        "pii.assigned_secret": 1, "pii.api_token": 0, "pii.private_key": 0, "pii.jwt": 0}
    assert (c["documents_changed"], c["documents_in"], c["documents_out"]) == (4, 5, 5)
    assert art.manifest["meta"]["num_documents"] == 5
    assert len(list_parts(art.path)) == 2

    # resume: a finished part is reused, the other recomputed; same result
    done = sorted((tmp_path / "run" / "work" / "pii").glob("*.jsonl.zst"))
    done[1].unlink()
    again = run_stage(PiiRedact(), tmp_path / "run", inputs={"documents": inp})
    assert list(iter_documents(again.path)) == docs
    assert again.manifest["metrics"]["pii_tasks_resumed"] == 1
    assert again.manifest["counts"] == c
