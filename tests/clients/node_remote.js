// @libsql/client over HTTP with a token: a write, a batch in write mode and a read.
// usage: node node_remote.js <url> <auth token>
// Prints {"count": N} (rows of table r afterwards); on an error, its code on stderr, exit 1.
const { createClient } = require("@libsql/client");

async function main() {
  const [url, authToken] = process.argv.slice(2);
  const client = createClient({ url, authToken });
  try {
    await client.execute("CREATE TABLE IF NOT EXISTS r (x)");
    await client.batch(["INSERT INTO r VALUES (1)", "INSERT INTO r VALUES (2)"], "write");
    const rs = await client.execute("SELECT count(*) FROM r");
    console.log(JSON.stringify({ count: Number(rs.rows[0][0]) }));
  } finally {
    client.close();
  }
}

main().catch((e) => {
  console.error(`${e.code || ""} ${e.message}`);
  process.exit(1);
});
