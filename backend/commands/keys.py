"""``python -m backend keys``: CURVE keypairs and the server's allow-list of client keys.

    keys make DIR                    the server's keypair (DIR/server.key, DIR/server.key_secret) and DIR/clients/
    keys make DIR --name alice       a client keypair (DIR/alice.key, DIR/alice.key_secret), made on the client
    keys allow DIR alice.key         add a client's public key (a .key file or 40 Z85 characters) to the allow-list
    keys list DIR                    the server's public key, the allowed clients and the keypairs in DIR

Give a client the server's public key (``server.key``: public, safe to share) and keep every ``.key_secret``
on its own machine.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("keys", help="CURVE keys: make keypairs, allow client keys, list them",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="keys_command", required=True)
    make = sub.add_parser("make", help="make a keypair (the server's by default) in DIR")
    make.add_argument("folder", metavar="DIR")
    make.add_argument("--name", default=None, help="a client keypair NAME.key / NAME.key_secret (default: the "
                      "server's, with an empty allow-list folder)")
    allow = sub.add_parser("allow", help="add a client's public key to the allow-list in DIR/clients")
    allow.add_argument("folder", metavar="DIR")
    allow.add_argument("key", metavar="KEY", help="the client's NAME.key file, or its 40-character public key")
    allow.add_argument("--name", help="the name to file it under (default: the key file's name)")
    lst = sub.add_parser("list", help="the server's public key and the allowed clients")
    lst.add_argument("folder", metavar="DIR")
    lst.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from backend import curve
    try:
        if args.keys_command == "make":
            if args.name:
                public, secret = curve.make_keypair(args.folder, args.name)
            else:
                public, secret = curve.init_server_folder(args.folder)
            key = curve.load_public_key(str(public)).decode()
            print(f"public key {key}\n  {public}  (public: give it to the other side)\n  {secret}  (secret: "
                  "keep it here, mode 0600)")
        elif args.keys_command == "allow":
            path = curve.allow_client(args.folder, args.key, args.name)
            print(f"allowed {path.stem}: {curve.load_public_key(str(path)).decode()} ({path})")
        else:
            listing = curve.list_keys(args.folder)
            if args.json:
                print(json.dumps(listing))
                return 0
            print(f"server public key: {listing['server_public_key'] or '(none: keys make DIR)'}")
            print(f"allowed clients ({len(listing['allowed_clients'])}):")
            for c in listing["allowed_clients"]:
                print(f"  {c['name']:24} {c.get('public_key') or c.get('error')}")
            if listing["keypairs"]:
                print(f"client keypairs in this folder: {', '.join(listing['keypairs'])}")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
