#!/usr/bin/env python3
"""Calls the Portcullis admin API (/api/v1) with HMAC-SHA256 request signing, using
nothing but the recipe in the README: the e2e tests run it to prove a client in another
language interoperates.

usage: signed_api.py BASE_URL TOKEN_ID SECRET METHOD PATH[?QUERY] [JSON_BODY]
prints the status code on the first line and the response body after it.
"""
import base64
import hashlib
import hmac
import sys
import time
import urllib.parse
import uuid

import requests


def signed(method, url, token, secret, body=b""):
    u = urllib.parse.urlsplit(url)
    pairs = urllib.parse.parse_qsl(u.query, keep_blank_values=True)
    enc = lambda s: urllib.parse.quote(s, safe="-._~")
    # Sorted after encoding, by key then value.
    query = "&".join(f"{k}={v}" for k, v in sorted((enc(k), enc(v)) for k, v in pairs))
    ts, nonce = str(int(time.time())), uuid.uuid4().hex
    message = "&".join(
        [token, ts, nonce, method.upper(), u.path, query, hashlib.sha256(body).hexdigest()]
    )
    signature = base64.b64encode(
        hmac.new(secret.encode(), message.encode(), hashlib.sha256).digest()
    ).decode()
    headers = {
        "Auth-Token": token,
        "Auth-Timestamp": ts,
        "Auth-Nonce": nonce,
        "Auth-Signature": signature,
    }
    if body:
        headers["Content-Type"] = "application/json"
    session = requests.Session()
    session.trust_env = False  # never a proxy from the environment: the gateway is local
    return session.request(method, url, data=body, headers=headers, timeout=10)


def main():
    base, token, secret, method, path = sys.argv[1:6]
    body = sys.argv[6].encode() if len(sys.argv) > 6 else b""
    r = signed(method, base + path, token, secret, body)
    print(r.status_code)
    print(r.text)


if __name__ == "__main__":
    main()
