"""A listing-only S3 endpoint over a sorted key list: ListObjectsV2 (prefix, delimiter, pages), HEAD bucket.

Benchmarks of listing strategies need a server whose own cost per request is small and that
serves requests concurrently, as S3 does. moto scans every key of the bucket on each request in
one Python process, so on a small machine it measures moto, not the strategy. This one answers
from a sorted list by bisection, on a thread per connection; a Proxy in front adds the latency.
"""

from __future__ import annotations

import bisect
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse
from xml.sax.saxutils import escape

HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'


class Listing:
    def __init__(self, bucket: str, keys: list[str]):
        self.bucket, self.keys = bucket, sorted(keys)

    def page(self, prefix: str, delimiter: str, start: str, max_keys: int) -> tuple[list, list, str | None]:
        keys, files, dirs = self.keys, [], []
        i = bisect.bisect_left(keys, max(start, prefix))
        while i < len(keys) and keys[i].startswith(prefix) and len(files) + len(dirs) < max_keys:
            rest = keys[i][len(prefix):]
            if delimiter and delimiter in rest:
                common = prefix + rest[: rest.index(delimiter) + len(delimiter)]
                dirs.append(common)
                i = bisect.bisect_left(keys, common[:-1] + chr(ord(common[-1]) + 1))
                continue
            files.append(keys[i])
            i += 1
        more = i < len(keys) and keys[i].startswith(prefix)
        return files, dirs, keys[i] if more else None


def handler(listing: Listing):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def reply(self, code: int, body: bytes = b"") -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self):
            self.reply(200 if urlparse(self.path).path.strip("/") == listing.bucket else 404)

        def do_GET(self):
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            if url.path.strip("/") != listing.bucket or q.get("list-type") != "2":
                body = b'<?xml version="1.0"?><Error><Code>NoSuchKey</Code><Message>listing only</Message></Error>'
                return self.reply(404, body)
            prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
            start = q.get("continuation-token") or q.get("start-after", "")
            files, dirs, token = listing.page(prefix, delimiter, start, int(q.get("max-keys", 1000)))
            parts = [HEAD, f"<Name>{listing.bucket}</Name><Prefix>{escape(prefix)}</Prefix>",
                     f"<KeyCount>{len(files) + len(dirs)}</KeyCount><MaxKeys>1000</MaxKeys>",
                     f"<Delimiter>{escape(delimiter)}</Delimiter>" if delimiter else "",
                     f"<IsTruncated>{'true' if token else 'false'}</IsTruncated>"]
            parts += [f"<Contents><Key>{escape(k)}</Key><LastModified>2026-12-01T00:00:00.000Z</LastModified>"
                      f"<ETag>&quot;{hash(k) & 0xffffffff:08x}&quot;</ETag><Size>1</Size>"
                      f"<StorageClass>STANDARD</StorageClass></Contents>" for k in files]
            parts += [f"<CommonPrefixes><Prefix>{escape(d)}</Prefix></CommonPrefixes>" for d in dirs]
            if token:
                parts.append(f"<NextContinuationToken>{escape(token)}</NextContinuationToken>")
            parts.append("</ListBucketResult>")
            self.reply(200, "".join(parts).encode())

    return Handler


def serve(bucket: str, keys: list[str]) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(Listing(bucket, keys)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
