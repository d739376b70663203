// The web UI's only script: the repository filter narrows as you type, copy buttons copy.
// Everything works without it (the filter is a GET form; the text to copy is on the page).
"use strict";

function filterAsYouType(input) {
  const results = document.getElementById("results");
  if (!results) return;
  let timer = null;
  let asked = 0;
  input.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const query = input.value.trim();
      const mine = ++asked;
      const params = new URLSearchParams({ partial: "1" });
      if (query) params.set("q", query);
      try {
        const answer = await fetch(input.dataset.filter + "?" + params, { credentials: "same-origin" });
        if (!answer.ok || mine !== asked) return;
        const html = await answer.text();
        if (mine !== asked) return;
        results.innerHTML = html;  // rendered and escaped by the server
        const shown = new URLSearchParams();
        if (query) shown.set("q", query);
        history.replaceState(null, "", input.dataset.filter + (query ? "?" + shown : ""));
      } catch (e) {
        // Offline or refused: the form still works.
      }
    }, 120);
  });
}

async function copy(button) {
  const text = button.dataset.copy;
  let done = false;
  if (navigator.clipboard && window.isSecureContext) {
    try { await navigator.clipboard.writeText(text); done = true; } catch (e) { done = false; }
  }
  if (!done) {  // plain HTTP on another host than localhost: no Clipboard API
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    try { done = document.execCommand("copy"); } catch (e) { done = false; }
    area.remove();
  }
  const label = button.textContent;
  button.textContent = done ? "Copied" : "Select and copy";
  button.classList.toggle("copied", done);
  setTimeout(() => { button.textContent = label; button.classList.remove("copied"); }, 1500);
}

document.addEventListener("DOMContentLoaded", () => {
  const input = document.querySelector("input[data-filter]");
  if (input) filterAsYouType(input);
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-copy]");
    if (button) copy(button);
  });
  document.addEventListener("keydown", (event) => {
    // "/" focuses the filter, as on many code hosts.
    if (event.key === "/" && input && document.activeElement !== input
        && !(document.activeElement && /INPUT|TEXTAREA/.test(document.activeElement.tagName))) {
      event.preventDefault();
      input.focus();
    }
  });
});
