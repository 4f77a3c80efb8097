// @libsql/client over WebSocket: every value type, a batch in write mode, an interactive
// transaction committed and one rolled back.
// usage: node node_ws.js <ws url> [auth token]
// Prints a JSON summary; on an error, its code and message on stderr, exit 1.
const { createClient } = require("@libsql/client");

async function main() {
  const [url, authToken] = process.argv.slice(2);
  const client = createClient({ url, authToken, intMode: "bigint" });
  try {
    await client.execute("CREATE TABLE IF NOT EXISTS v (id INTEGER PRIMARY KEY, i, f, t, b, n)");
    await client.execute({
      sql: "INSERT INTO v (i, f, t, b, n) VALUES (?, ?, ?, ?, ?)",
      args: [9007199254740993n, 0.25, "tëxt", new Uint8Array([0, 1, 255]), null],
    });
    const values = await client.execute("SELECT i, f, t, hex(b), n, typeof(i), typeof(f) FROM v ORDER BY id DESC LIMIT 1");
    await client.batch(["CREATE TABLE IF NOT EXISTS w (x)", "INSERT INTO w VALUES (1)", "INSERT INTO w VALUES (2)"], "write");
    const committed = await client.transaction("write");
    await committed.execute("INSERT INTO w VALUES (10)");
    await committed.commit();
    const rolledBack = await client.transaction("write");
    await rolledBack.execute("INSERT INTO w VALUES (100)");
    await rolledBack.rollback();
    const sum = await client.execute("SELECT sum(x) FROM w");
    const row = values.rows[0];
    console.log(JSON.stringify({
      i: row[0].toString(), f: row[1], t: row[2], b: row[3], n: row[4], ti: row[5], tf: row[6],
      sum: Number(sum.rows[0][0]),
      protocol: client.protocol,
    }));
  } finally {
    client.close();
  }
}

main().catch((e) => {
  console.error(`${e.code || ""} ${e.message}`);
  process.exit(1);
});
