// Write actions: the API token form and the notices every action leaves.
import { $, el, token } from "./live.js";

const MAX_TOASTS = 5;

// toast shows a notice; errors stay until dismissed, successes fade.
export function toast(kind, text) {
  const box = $("#toasts");
  const item = el(
    "div",
    { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status", data: { kind } },
    el("span", { class: "toast-text" }, text),
    el("button", { type: "button", class: "ghost", "aria-label": "Dismiss", onclick: () => item.remove() }, "×"),
  );
  box.prepend(item);
  while (box.children.length > MAX_TOASTS) box.lastElementChild.remove();
  if (kind !== "error") setTimeout(() => item.remove(), 4000);
  return item;
}

// act runs one API action: it refuses early without a token and reports
// the outcome, with the API's own message on failure. It returns the
// response, or undefined when the action failed.
export async function act(what, call, button) {
  if (!token.get()) {
    toast("error", `${what}: enter the API token first.`);
    $("#token-input")?.focus();
    return undefined;
  }
  if (button) button.disabled = true;
  try {
    const res = await call();
    toast("ok", `${what}: done.`);
    return res ?? true;
  } catch (err) {
    toast("error", `${what} failed: ${err.message}`);
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

export function setupToken() {
  const form = $("#token-form"), input = $("#token-input"), state = $("#token-state");
  const show = () => {
    const set = token.get() !== "";
    state.dataset.state = set ? "set" : "unset";
    state.textContent = set ? "Token saved for this tab." : "Actions need the token (kept for this tab only).";
    input.value = "";
    input.placeholder = set ? "•••••••• (saved; paste to replace)" : "paste the token from api.token_file";
  };
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (!input.value.trim()) {
      toast("error", "The token is empty.");
      return;
    }
    token.set(input.value);
    show();
  });
  $("#token-forget").addEventListener("click", () => {
    token.clear();
    show();
  });
  show();
}
