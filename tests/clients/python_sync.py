"""One sync of a Python `libsql` embedded replica, from its local files, then its rows.

usage: python_sync.py <local database path> <sync url> [auth token]
Prints the rows of `SELECT id, hex(v) FROM t ORDER BY id` as JSON.
"""
import json
import sys

import libsql

path, url = sys.argv[1], sys.argv[2]
token = sys.argv[3] if len(sys.argv) > 3 else ""
conn = libsql.connect(path, sync_url=url, auth_token=token)
conn.sync()
rows = conn.execute("SELECT id, hex(v) FROM t ORDER BY id").fetchall()
print(json.dumps([[r[0], r[1]] for r in rows]))
