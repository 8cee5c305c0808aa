"""What a caller of the served model can make it read and decode: only allowed URLs, as sent, within a budget."""

from __future__ import annotations

import http.server
import threading

import pandas as pd
import pytest

from ftl.model import classifier


@pytest.fixture
def web(images):
    """A real HTTP server: /imgs/ok.png, /imgs/hop.png (a 302 to /admin/secret.png), and /admin/secret.png."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (the standard library's name)
            seen.append(self.path)
            if self.path == "/imgs/hop.png":
                self.send_response(302)
                self.send_header("Location", "/admin/secret.png")
                self.end_headers()
                return
            body = {"/imgs/ok.png": images[0], "/admin/secret.png": images[1]}.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_escapes_and_redirects_never_reach_outside_the_prefix(model_folder, web, monkeypatch):
    base, seen = web
    monkeypatch.setenv(classifier.URI_PREFIXES_ENV, f"{base}/imgs")
    model = classifier.ImageClassifier(model_folder)
    assert len(model.predict(pd.DataFrame({"uri": [f"{base}/imgs/ok.png"]}))) == 1
    for sneaky in (f"{base}/imgs/%2e%2e/admin/secret.png", f"{base}/imgs/%2E%2E%2Fadmin%2Fsecret.png",
                   f"{base}/imgs/..\\admin\\secret.png"):
        with pytest.raises(classifier.ModelInputError, match="escaped"):
            model.predict(pd.DataFrame({"uri": [sneaky]}))
    with pytest.raises(Exception):  # the 302's own (empty) body is no image; its Location is never followed
        model.predict(pd.DataFrame({"uri": [f"{base}/imgs/hop.png"]}))
    assert "/admin/secret.png" not in seen


def test_one_request_has_a_budget_of_bytes_and_pixels(model_folder, images, tmp_path, monkeypatch):
    model = classifier.ImageClassifier(model_folder)
    monkeypatch.setenv(classifier.REQUEST_BYTES_ENV, str(sum(map(len, images[:2]))))
    assert len(model.predict(pd.DataFrame({"image": images[:2]}))) == 2
    with pytest.raises(classifier.ModelInputError, match="byte budget"):
        model.predict(pd.DataFrame({"image": images[:3]}))  # the image column counts as URIs do
    for i, b in enumerate(images[:3]):
        (tmp_path / f"{i}.png").write_bytes(b)
    monkeypatch.setenv(classifier.URI_PREFIXES_ENV, str(tmp_path))
    with pytest.raises(classifier.ModelInputError, match="byte budget"):
        model.predict(pd.DataFrame({"uri": [str(tmp_path / f"{i}.png") for i in range(3)]}))
    monkeypatch.delenv(classifier.REQUEST_BYTES_ENV)
    monkeypatch.setenv(classifier.REQUEST_PIXELS_ENV, str(56 * 56 * 2))  # the pictures are 56×56
    assert len(model.predict(pd.DataFrame({"image": images[:2]}))) == 2
    with pytest.raises(classifier.ModelInputError, match="more pixels than its budget"):
        model.predict(pd.DataFrame({"image": images[:3]}))
