// One sync of an @libsql/client embedded replica (a `file:` URL with `syncUrl`), from its
// local files, then its rows.
// usage: node node_sync.js <local database path> <sync url> [auth token]
// Prints the rows of `SELECT id, hex(v) FROM t ORDER BY id` as JSON.
const { createClient } = require("@libsql/client");

async function main() {
  const [path, url, authToken] = process.argv.slice(2);
  const client = createClient({ url: `file:${path}`, syncUrl: url, authToken });
  await client.sync();
  const rs = await client.execute("SELECT id, hex(v) FROM t ORDER BY id");
  console.log(JSON.stringify(rs.rows.map((r) => [Number(r[0]), r[1]])));
  client.close();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
