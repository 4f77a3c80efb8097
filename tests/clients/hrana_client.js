// @libsql/hrana-client (the Hrana library @libsql/client is built on) against the server:
// stored SQL, a batch with conditions (through a cursor in Hrana 3), describe, autocommit.
// usage: node hrana_client.js <ws|http> <url> <protocol version: 2|3> [subprotocols]
// With subprotocols (comma-separated), the library offers only those of its list over a
// WebSocket (it offers its whole list otherwise, best first), so each one can be exercised.
// Hrana 1 has no stored SQL and no describe: the script uses SQL text and skips describe.
// Prints a JSON summary; on an error, its code and message on stderr, exit 1.
const hrana = require("@libsql/hrana-client");

function offerOnly(subprotocols) {
  // The library's lists of subprotocols (a module it does not export by name).
  const lists = require(require.resolve("@libsql/hrana-client").replace(/index\.js$/, "ws/client.js"));
  const keep = new Set(subprotocols.split(","));
  for (const list of [lists.subprotocolsV2, lists.subprotocolsV3]) {
    for (const name of Array.from(list.keys())) {
      if (!keep.has(name)) list.delete(name);
    }
  }
}

async function main() {
  const [mode, url, versionText, offer] = process.argv.slice(2);
  const version = Number(versionText);
  if (offer) offerOnly(offer);
  const client = mode === "ws" ? hrana.openWs(url, undefined, version) : hrana.openHttp(url, undefined, undefined, version);
  try {
    const negotiated = await client.getVersion();
    const stream = client.openStream();
    await stream.run("CREATE TABLE IF NOT EXISTS h (x)");
    const text = "INSERT INTO h VALUES (?)";
    const insert = negotiated < 2 ? text : mode === "ws" ? client.storeSql(text) : stream.storeSql(text);

    const batch = stream.batch(negotiated >= 3);
    const first = batch.step();
    const inserted = first.run([insert, [41]]);
    const counted = batch.step().condition(hrana.BatchCond.ok(first)).queryValue("SELECT count(*) FROM h");
    const skipped = batch.step().condition(hrana.BatchCond.not(hrana.BatchCond.ok(first))).run("SELECT 1");
    const failStep = batch.step();
    const failing = failStep.run("SELECT nope");
    const afterError = batch.step().condition(hrana.BatchCond.error(failStep)).queryValue("SELECT 'recovered'");
    await batch.execute();
    const insertResult = await inserted;
    const count = (await counted).value;
    const skippedResult = await skipped;
    let failed = null;
    try {
      await failing;
    } catch (e) {
      failed = e.code || "error";
    }
    let recovered = null;
    try {
      recovered = (await afterError)?.value ?? null;
    } catch (e) {
      recovered = `error ${e.message}`;
    }

    const described = negotiated >= 2 ? await stream.describe("SELECT ?1 AS one, x FROM h") : null;
    const autocommit = negotiated >= 3 ? await stream.getAutocommit() : null;
    stream.close();
    console.log(JSON.stringify({
      version: negotiated,
      affected: insertResult.affectedRowCount,
      count: Number(count),
      skipped: skippedResult === undefined,
      failed,
      recovered,
      columns: described && described.columns.map((c) => c.name),
      params: described && described.paramNames,
      autocommit,
    }));
  } finally {
    client.close();
  }
}

main().catch((e) => {
  console.error(`${e.code || ""} ${e.message}`);
  process.exit(1);
});
