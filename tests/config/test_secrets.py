"""Masking: nested and camelCase credential keys, passwords inside URLs and inside error messages."""

from __future__ import annotations

import pytest

from ftl import config
from ftl.cli import main
from ftl.secrets import is_secret, mask_secrets, mask_text, split_userinfo
from tests.conftest import write_workflow

SENTINEL = "sentinel-Zq8x1"


@pytest.mark.parametrize("name", [
    "key", "secret", "token", "password", "session_token", "aws_secret_access_key", "aws_access_key_id",
    "SecretAccessKey", "SSECustomerKey", "SSECustomerKeyMD5", "AccessKeyId", "api_key", "apiKey", "ApiKey",
    "private_key", "privateKey", "credentials", "Credentials", "client_secret", "X-Amz-Security-Token",
    "X-Amz-Signature", "X-Amz-Credential", "account_key", "sas_token", "Authorization", "MLFLOW_TRACKING_PASSWORD",
])
def test_credential_names_are_secret(name):
    assert is_secret(name), name


@pytest.mark.parametrize("name", [
    "label_key", "image_keys", "uri", "endpoint_url", "region", "bucket", "SSEKMSKeyId", "max_tokens", "keys",
    "username", "key_prefix", "tokenizer", "lease_ttl",
])
def test_ordinary_names_are_not(name):
    assert not is_secret(name), name


def test_nested_and_camel_case_values_are_masked_and_nothing_else():
    data = {
        "storage": {"options": {
            "key": "AKIAABCDEFGHIJKLMNOP", "secret": SENTINEL, "client_kwargs": {"endpoint_url": "http://minio:9000"},
            "s3_additional_kwargs": {"SSECustomerKey": SENTINEL, "SSECustomerAlgorithm": "AES256"},
            "config_kwargs": {"retries": {"max_attempts": 3}}, "profiles": [{"api_key": SENTINEL, "name": "p"}],
            "credentials": {"SecretAccessKey": SENTINEL, "AccessKeyId": "x"}, "private_key": SENTINEL,
        }},
        "source": {"uri": "s3://b/p", "label_key": "cls"},
        "tracking": {"uri": f"https://ftl:{SENTINEL}@mlflow.internal:5000"},
        "empty": {"secret": ""},
    }
    masked = mask_secrets(data)
    assert SENTINEL not in repr(masked) and "AKIAABCDEFGHIJKLMNOP" not in repr(masked)
    opts = masked["storage"]["options"]
    assert opts["secret"] == opts["key"] == opts["credentials"] == opts["private_key"] == "***"
    assert opts["s3_additional_kwargs"] == {"SSECustomerKey": "***", "SSECustomerAlgorithm": "AES256"}
    assert opts["profiles"] == [{"api_key": "***", "name": "p"}]
    assert opts["client_kwargs"] == {"endpoint_url": "http://minio:9000"}
    assert opts["config_kwargs"] == {"retries": {"max_attempts": 3}}
    assert masked["source"] == data["source"]
    assert masked["tracking"]["uri"] == "https://ftl:***@mlflow.internal:5000"
    assert masked["empty"] == {"secret": ""}  # nothing to hide: an empty value stays visibly empty
    assert data["storage"]["options"]["secret"] == SENTINEL  # a copy; the workflow itself is untouched


@pytest.mark.parametrize("text, kept", [
    (f"Could not connect to the endpoint URL: \"http://minio:{SENTINEL}@10.0.0.5:9000/bucket/key\"",
     "http://minio:***@10.0.0.5:9000/bucket/key"),
    (f"cannot use MLflow at https://user:{SENTINEL}@mlflow:5000: 401", "https://user:***@mlflow:5000"),
    (f"S3FileSystem(key='AKIAABCDEFGHIJKLMNOP', secret='{SENTINEL}', token=None)", "secret='***'"),
    (f"{{'SecretAccessKey': '{SENTINEL}', 'Region': 'eu'}}", "'Region': 'eu'"),
    (f"GET /b/k?X-Amz-Credential=AKIA%2F{SENTINEL}&X-Amz-Signature={SENTINEL}&part=1", "&part=1"),
    (f'{{"api_key": "{SENTINEL}", "private_key": "{SENTINEL}"}}', '"api_key": "***"'),
    ("NoSuchKey: key: images/a.png does not exist", "key: images/a.png"),  # an object key, not a credential
])
def test_credentials_inside_messages_are_masked(text, kept):
    out = mask_text(text)
    assert SENTINEL not in out and "AKIAABCDEFGHIJKLMNOP" not in out, out
    assert kept in out, out


def test_show_masks_every_credential(tmp_path, capsys):
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": "s3://b/images"},
                        storage={"options": {"secret": SENTINEL, "endpoint_url": f"http://u:{SENTINEL}@minio:9000",
                                             "s3_additional_kwargs": {"SSECustomerKey": SENTINEL}}},
                        extract={"output": "s3://b/out"}, tracking={"uri": f"https://u:{SENTINEL}@mlflow:5000"})
    assert main(["show", str(wf)]) == 0
    shown = capsys.readouterr().out
    assert SENTINEL not in shown
    assert "http://u:***@minio:9000" in shown and "https://u:***@mlflow:5000" in shown
    # The workflow a run uses keeps the real values: only what is shown is masked.
    assert config.load_workflow(wf).storage.options["secret"] == SENTINEL


def test_a_uri_splits_into_the_uri_and_its_credentials():
    assert split_userinfo(f"https://ftl:{SENTINEL}@mlflow:5000/x") == ("https://mlflow:5000/x", "ftl", SENTINEL)
    assert split_userinfo("http://127.0.0.1:5000") == ("http://127.0.0.1:5000", None, None)
    assert split_userinfo("sqlite:///mlflow.db") == ("sqlite:///mlflow.db", None, None)


@pytest.mark.parametrize("text, secret", [
    ("https://h/p?password=hunter2&x=1", "hunter2"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Security-Token=TOKEN123&X-Amz-Date=1", "TOKEN123"),
    ("https://storage.googleapis.com/b/o?X-Goog-Signature=deadbeef99&X-Goog-Date=1", "deadbeef99"),
    ("https://acct.blob.core.windows.net/c/a.png?sv=2020&sig=SAS%2Bsecret&se=1", "SAS%2Bsecret"),
    ("https://h/p?pwd=hunter2", "hunter2"), ("https://h/p?auth=opaque77", "opaque77"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "eyJhbGciOiJIUzI1NiJ9"),
    ("failed reading https://h/a.png?token=t0k3n: 403 Forbidden", "t0k3n"),
])
def test_every_query_parameter_and_bearer_value_is_masked(text, secret):
    masked = mask_text(text)
    assert secret not in masked and "***" in masked


def test_plain_parameters_and_object_keys_stay():
    for text in ("https://h/a?label=cat&size=3", "s3://bucket/label_key=3/a.png", "key: images/a.png"):
        assert mask_text(text) == text


def test_two_values_after_one_set_is_a_usage_line_not_a_traceback(capsys):
    assert main(["show", "workflows/quickstart.yaml", "--set", "storage.x=1", "storage.y=2"]) == 2
    err = capsys.readouterr().err
    assert "repeat it, --set a.b=1 --set a.c=2" in err and "Traceback" not in err


def test_an_unexpected_error_is_one_masked_line(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("GET https://h/a.png?X-Amz-Security-Token=SeCrEt99 failed")

    monkeypatch.setattr(config, "load_workflow", broken)
    assert main(["show", "workflows/quickstart.yaml"]) == 1
    err = capsys.readouterr().err
    assert "SeCrEt99" not in err and "Traceback" not in err and "RuntimeError" in err and "-v" in err
