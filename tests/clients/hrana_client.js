// @libsql/hrana-client (the Hrana library @libsql/client is built on) against the server:
// stored SQL, a batch with conditions (through a cursor in Hrana 3), describe, autocommit.
// usage: node hrana_client.js <ws|http> <url> <protocol version: 2|3>
// Prints a JSON summary; on an error, its code and message on stderr, exit 1.
const hrana = require("@libsql/hrana-client");

async function main() {
  const [mode, url, versionText] = process.argv.slice(2);
  const version = Number(versionText);
  const client = mode === "ws" ? hrana.openWs(url, undefined, version) : hrana.openHttp(url, undefined, undefined, version);
  try {
    const negotiated = await client.getVersion();
    const stream = client.openStream();
    await stream.run("CREATE TABLE IF NOT EXISTS h (x)");
    const insert = mode === "ws" ? client.storeSql("INSERT INTO h VALUES (?)") : stream.storeSql("INSERT INTO h VALUES (?)");

    const batch = stream.batch(version >= 3);
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

    const described = await stream.describe("SELECT ?1 AS one, x FROM h");
    const autocommit = version >= 3 ? await stream.getAutocommit() : null;
    stream.close();
    console.log(JSON.stringify({
      version: negotiated,
      affected: insertResult.affectedRowCount,
      count: Number(count),
      skipped: skippedResult === undefined,
      failed,
      recovered,
      columns: described.columns.map((c) => c.name),
      params: described.paramNames,
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
