// Calls to the server. Every failure becomes an ApiError whose message is the server's own
// (OpenAI-style {"error": {"message"}}) or says why no answer came: the page shows it.
const KEY_STORE = "steer-gguf-api-key";
let apiKey = sessionStorage.getItem(KEY_STORE) || "";

export class ApiError extends Error {
  constructor(message, status = 0, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function setKey(key) {
  apiKey = key.trim();
  if (apiKey) sessionStorage.setItem(KEY_STORE, apiKey);
  else sessionStorage.removeItem(KEY_STORE);
}

export function getKey() { return apiKey; }

function headers(json) {
  const h = {};
  if (apiKey) h.Authorization = "Bearer " + apiKey;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function errorOf(resp) {
  let message = null, code = null;
  try {
    const body = await resp.json();
    message = body?.error?.message ?? null;
    code = body?.error?.code ?? null;
  } catch (_) { /* not JSON: the status says it */ }
  if (resp.status === 401) message = (message || "unauthorized") + " (enter the server's API key at the top right)";
  return new ApiError(message || `HTTP ${resp.status} ${resp.statusText}`, resp.status, code);
}

async function send(path, init) {
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(`cannot reach the server (${e.message})`);
  }
  if (!resp.ok) throw await errorOf(resp);
  return resp;
}

export async function getJSON(path) {
  return (await send(path, { headers: headers(false) })).json();
}

export async function postJSON(path, body, signal) {
  return (await send(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal })).json();
}

// A streamed completion: yields each chunk object; an error event after the 200 throws.
export async function* stream(path, body, signal) {
  const resp = await send(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new ApiError(obj.error.message || "generation failed", 500, obj.error.code);
        yield obj;
      }
    }
  }
  throw new ApiError("the server closed the stream before its end");
}
