// The chat page: talks to the same OpenAI-compatible API as any client (GET /v1/models,
// POST /v1/chat/completions with stream: true), so it needs nothing the server does not already
// offer and loads nothing from the network but this server. Each reply can be rated (thumbs up
// or down) and, with "Compare two replies", two samples are shown and the one picked is kept:
// both go to POST /v1/feedback with the exact conversation, for `hybridlm feedback export`. The API key lives in sessionStorage:
// it survives a reload but not the end of the browser session, and is never written to the page.
"use strict";

const KEY_STORAGE = "hybridlm.apiKey";
const STATUS_NAMES = {400: "Bad request", 401: "Unauthorized", 404: "Not found", 413: "Too large",
                      429: "Rate limited", 503: "Server busy"};
const $ = (id) => document.getElementById(id);
const history = [];  // the conversation sent with each request: [{role, content}]
let running = null;  // the AbortController of the reply being streamed
let listing = 0;  // the latest model list request: an older answer (a key since changed) is dropped

function headers() {
  const key = $("api-key").value.trim();
  const h = {"Content-Type": "application/json"};
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

// "429 Rate limited: <server message> (retry after 3 s)" from an error response.
async function describeError(response) {
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status text */ }
  const name = STATUS_NAMES[response.status] || "Error";
  const retry = response.headers.get("Retry-After");
  const when = retry && !/retry in \d/.test(message) ? ` (retry after ${retry} s)` : "";
  return `${response.status} ${name}: ${message}${when}`;
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

async function loadModels() {
  const select = $("model");
  const mine = ++listing;
  try {
    const response = await fetch("v1/models", {headers: headers()});
    const error = response.ok ? null : await describeError(response);
    const data = response.ok ? (await response.json()).data : null;
    if (mine !== listing) return;
    if (error) throw new Error(error);
    const chosen = select.value;
    select.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
    if (data.some((m) => m.id === chosen)) select.value = chosen;
    notice("");
  } catch (err) {
    if (mine !== listing) return;
    select.replaceChildren();
    notice(`Could not list models: ${err.message}`);
  }
}

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  item.dataset.role = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : role === "assistant" ? "Model" : "Error";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  item.append(who, body);
  if (role === "error") item.setAttribute("role", "alert");
  $("messages").append(item);
  item.scrollIntoView({block: "end"});
  return item;
}

// Yields the `data:` payload of each server-sent event as the bytes arrive.
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const lines = block.split("\n").filter((l) => l.startsWith("data:"));
      if (lines.length) yield lines.map((l) => l.slice(5).replace(/^ /, "")).join("\n");
    }
  }
}

function requestBody() {
  const body = {model: $("model").value, messages: history, stream: true};
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  return body;
}

// Streams one reply into `item`; returns its text. data-chunks counts the deltas shown and
// data-state ends as "done", "stopped" or "error" (what a reader, or a test, can wait for).
async function streamReply(item, signal) {
  const response = await fetch("v1/chat/completions",
                               {method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal});
  if (!response.ok) throw new Error(await describeError(response));
  const text = item.querySelector(".text");
  let reply = "", chunks = 0;
  for await (const data of sseData(response.body)) {
    if (data === "[DONE]") break;
    const event = JSON.parse(data);
    if (event.error) throw new Error(`${event.error.message}`);
    const choice = event.choices && event.choices[0];
    if (!choice) continue;
    if (choice.delta && choice.delta.content) {
      reply += choice.delta.content;
      text.textContent = reply;
      item.dataset.chunks = String(++chunks);
    }
    if (choice.finish_reason) item.dataset.finish = choice.finish_reason;
  }
  if (item.dataset.finish === "content_filter") addMessage("error", "The reply was stopped by the safety filter.");
  return reply;
}

// POST /v1/feedback; returns an error message, or "" when stored.
async function sendFeedback(body) {
  try {
    const response = await fetch("v1/feedback", {method: "POST", headers: headers(),
                                                 body: JSON.stringify({model: $("model").value, ...body})});
    return response.ok ? "" : await describeError(response);
  } catch (err) {
    return err.message;
  }
}

function button(label, text, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

// Thumbs up / down under a finished reply; data-feedback ends as "up" or "down" once stored.
function addRating(item, messages, reply) {
  const bar = document.createElement("div");
  bar.className = "feedback";
  const rate = async (rating) => {
    bar.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    const error = await sendFeedback({messages, reply, rating});
    if (error) {
      bar.querySelectorAll("button").forEach((b) => { b.disabled = false; });
      notice(`Could not send feedback: ${error}`);
      return;
    }
    item.dataset.feedback = rating;
    bar.append(" thanks");
  };
  bar.append(button("Good reply", "\u{1F44D}", () => rate("up")), button("Bad reply", "\u{1F44E}", () => rate("down")));
  item.append(bar);
}

// Compare mode: two samples of the reply; the one picked joins the conversation and the pair
// goes to /v1/feedback. Resolves once a reply is picked.
async function compareReplies(messages) {
  const response = await fetch("v1/chat/completions", {method: "POST", headers: headers(),
                                                       body: JSON.stringify({...requestBody(), stream: false, n: 2})});
  if (!response.ok) throw new Error(await describeError(response));
  const texts = (await response.json()).choices.map((c) => c.message.content || "");
  if (texts[0] === texts[1]) {
    addMessage("error", "Both replies are the same text (raise the temperature to compare); the reply is kept.");
    addMessage("assistant", texts[0]).dataset.state = "done";
    return texts[0];
  }
  const items = texts.map((t) => addMessage("assistant", t));
  return new Promise((resolve) => {
    items.forEach((item, i) => {
      item.dataset.state = "choosing";
      item.append(button(`Pick reply ${i + 1}`, "Pick this reply", async () => {
        items.forEach((other) => other.querySelectorAll("button").forEach((b) => { b.disabled = true; }));
        const error = await sendFeedback({messages, chosen: texts[i], rejected: texts[1 - i]});
        if (error) notice(`Could not send feedback: ${error}`);
        items.forEach((other, j) => { other.dataset.picked = String(i === j); other.dataset.state = "done"; });
        resolve(texts[i]);
      }));
    });
  });
}

async function send(event) {
  event.preventDefault();
  const input = $("input");
  const content = input.value.trim();
  if (!content || running) return;
  input.value = "";
  addMessage("user", content);
  const turn = {role: "user", content};
  history.push(turn);
  if ($("compare").checked) return compareTurn(turn, content);
  const asked = history.map((m) => ({...m}));
  const item = addMessage("assistant", "");
  item.dataset.state = "streaming";
  running = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    const reply = await streamReply(item, running.signal);
    history.push({role: "assistant", content: reply});
    item.dataset.state = "done";
    addRating(item, asked, reply);
  } catch (err) {
    const stopped = err.name === "AbortError";
    item.dataset.state = stopped ? "stopped" : "error";
    if (history.at(-1) !== turn) {
      // "New chat" cleared the conversation while this reply streamed: nothing to keep.
    } else if (stopped) {
      history.push({role: "assistant", content: item.querySelector(".text").textContent});
    } else {
      history.pop();  // the question was not answered: give it back to the input to retry
      input.value = content;
      if (!item.querySelector(".text").textContent) item.remove();
      addMessage("error", err.message);
    }
  } finally {
    running = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    input.focus();
  }
}

async function compareTurn(turn, content) {
  running = new AbortController();
  $("send").disabled = true;
  try {
    const picked = await compareReplies(history.map((m) => ({...m})));
    if (history.at(-1) === turn) history.push({role: "assistant", content: picked});
  } catch (err) {
    history.pop();
    $("input").value = content;
    addMessage("error", err.message);
  } finally {
    running = null;
    $("send").disabled = false;
    $("input").focus();
  }
}

function init() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    loadModels();
  });
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || e.shiftKey) return;
    e.preventDefault();
    $("composer").requestSubmit();
  });
  $("stop").addEventListener("click", () => running && running.abort());
  $("clear").addEventListener("click", () => {
    if (running) running.abort();
    history.length = 0;
    $("messages").replaceChildren();
  });
  loadModels();
}

init();
