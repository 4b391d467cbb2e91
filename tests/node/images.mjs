// The OpenAI Node SDK against a running imagegate (tests/test_clients.py runs this).
// Reads IMAGEGATE_URL, IMAGEGATE_KEY and IMAGEGATE_MODEL; prints one JSON object of what each
// call gave: image sizes read from the PNG header, and the status and message of an error.
import OpenAI, { toFile } from "openai";

const url = process.env.IMAGEGATE_URL;
const model = process.env.IMAGEGATE_MODEL;
const client = (path) =>
  new OpenAI({ apiKey: process.env.IMAGEGATE_KEY, baseURL: url + path, maxRetries: 0 });

function pngSize(b64) {
  const bytes = Buffer.from(b64, "base64");
  if (bytes.subarray(1, 4).toString() !== "PNG") return null;
  return [bytes.readUInt32BE(16), bytes.readUInt32BE(20)];
}

async function refusal(call) {
  try {
    await call();
    return null;
  } catch (error) {
    return { status: error.status, message: error.message };
  }
}

const openai = client("/openai/v1");
const generated = await openai.images.generate({
  model,
  prompt: "a red circle on a blue background",
  n: 2,
  size: "64x64",
  response_format: "b64_json",
});
const input = Buffer.from(generated.data[0].b64_json, "base64");
const edited = await openai.images.edit({
  model,
  image: await toFile(input, "in.png", { type: "image/png" }),
  prompt: "now make the circle green",
  response_format: "b64_json",
});
const linked = await client("/v1").images.generate({
  model,
  prompt: "a green star",
  response_format: "url",
});
const listed = await openai.models.list();

console.log(
  JSON.stringify({
    generate: generated.data.map((item) => pngSize(item.b64_json)),
    edit: edited.data.map((item) => pngSize(item.b64_json)),
    v1_url: linked.data.map((item) => item.url),
    models: listed.data.map((item) => item.id),
    unknown_model: await refusal(() => openai.images.generate({ model: "nope", prompt: "x" })),
    bad_key: await refusal(() =>
      new OpenAI({ apiKey: "sk-wrong", baseURL: url + "/openai/v1", maxRetries: 0 }).models.list(),
    ),
  }),
);
