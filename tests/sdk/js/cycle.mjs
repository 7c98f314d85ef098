// One control-plane cycle through the AWS SDK for JavaScript v3, as a user's script would run it:
// create -> wait for ACTIVE -> put -> describe -> update -> delete, and the error types it must
// parse. Prints one JSON line of what it saw; exits 1 with the message on any surprise.
import {
  FirehoseClient, CreateDeliveryStreamCommand, DescribeDeliveryStreamCommand, PutRecordBatchCommand,
  UpdateDestinationCommand, DeleteDeliveryStreamCommand, PutRecordCommand,
  ResourceInUseException, ConcurrentModificationException, ResourceNotFoundException, LimitExceededException,
} from "@aws-sdk/client-firehose";

const env = process.env;
const client = (akid, secret, maxAttempts = 3) => new FirehoseClient({
  endpoint: env.ENDPOINT, region: "us-east-1", maxAttempts,
  credentials: { accessKeyId: akid, secretAccessKey: secret },
});
const admin = client(env.AKID, env.SECRET);
const once = client(env.AKID, env.SECRET, 1);
const name = env.STREAM;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const seen = {};

async function errorOf(promise) {
  try { await promise; } catch (err) { return err; }
  throw new Error("expected an error");
}
async function describe() {
  return (await admin.send(new DescribeDeliveryStreamCommand({ DeliveryStreamName: name }))).DeliveryStreamDescription;
}

try {
  const created = await admin.send(new CreateDeliveryStreamCommand({
    DeliveryStreamName: name, DeliveryStreamType: "DirectPut",
    ExtendedS3DestinationConfiguration: {
      RoleARN: "arn:aws:iam::000000000000:role/firehose", BucketARN: `arn:aws:s3:::${env.BUCKET}`,
      Prefix: `${name}/`, BufferingHints: { SizeInMBs: 1, IntervalInSeconds: 1 },
    },
  }));
  seen.arn = created.DeliveryStreamARN;
  for (let i = 0; i < 100 && (await describe()).DeliveryStreamStatus !== "ACTIVE"; i++) await sleep(100);
  seen.status = (await describe()).DeliveryStreamStatus;
  const put = await admin.send(new PutRecordBatchCommand({
    DeliveryStreamName: name,
    Records: [0, 1, 2].map((n) => ({ Data: new TextEncoder().encode(JSON.stringify({ n }) + "\n") })),
  }));
  seen.failedPutCount = put.FailedPutCount;
  const version = (await describe()).VersionId;
  const stale = await errorOf(admin.send(new UpdateDestinationCommand({
    DeliveryStreamName: name, CurrentDeliveryStreamVersionId: "99", DestinationId: "destinationId-000000000001",
    ExtendedS3DestinationUpdate: { Prefix: "v2/" },
  })));
  seen.stale = stale instanceof ConcurrentModificationException ? stale.name : `not parsed: ${stale.name}`;
  await admin.send(new UpdateDestinationCommand({
    DeliveryStreamName: name, CurrentDeliveryStreamVersionId: version, DestinationId: "destinationId-000000000001",
    ExtendedS3DestinationUpdate: { Prefix: `${name}-v2/` },
  }));
  seen.versionAfterUpdate = (await describe()).VersionId;
  const dup = await errorOf(admin.send(new CreateDeliveryStreamCommand({
    DeliveryStreamName: name, S3DestinationConfiguration: { RoleARN: "r", BucketARN: `arn:aws:s3:::${env.BUCKET}` },
  })));
  seen.duplicate = dup instanceof ResourceInUseException ? dup.name : `not parsed: ${dup.name}`;
  const denied = await errorOf(client(env.LIMITED_AKID, env.LIMITED_SECRET).send(new PutRecordCommand({
    DeliveryStreamName: name, Record: { Data: new TextEncoder().encode("x") },
  })));
  seen.denied = denied.name;  // not in Firehose's model: a generic ServiceException with that name
  await sleep(1100);
  // More than 5 control-plane calls at once: some are refused with LimitExceededException
  // (the bucket is invalid, so none creates a stream).
  const codes = (await Promise.all(Array.from({ length: 12 }, () => errorOf(once.send(new CreateDeliveryStreamCommand({
    DeliveryStreamName: "never-created",
    S3DestinationConfiguration: { RoleARN: "r", BucketARN: "arn:aws:s3:::Not_A_Bucket" },
  })))))).map((err) => (err instanceof LimitExceededException ? "LimitExceededException" : err.name));
  seen.limit = codes.includes("LimitExceededException") ? "LimitExceededException" : codes.join(",");
  await sleep(1100);
  await admin.send(new DeleteDeliveryStreamCommand({ DeliveryStreamName: name }));
  let gone = null;
  for (let i = 0; i < 100 && gone === null; i++) {
    try { await describe(); await sleep(100); } catch (err) { gone = err; }
  }
  seen.deleted = gone instanceof ResourceNotFoundException ? gone.name : `not parsed: ${gone && gone.name}`;
  console.log(JSON.stringify(seen));
} catch (err) {
  console.error(`${err.name}: ${err.message}`);
  process.exit(1);
}
