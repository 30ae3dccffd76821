// Keyboard-first labeling: 1-9 choose a label (a chat reply's rating, a preference's candidate), t a tie, Enter
// submits, s skips, u undoes the last submission; on a chat item e edits the reply, Esc leaves the editor and
// Ctrl+Enter submits from it. Served from /static (the Content-Security-Policy allows no inline script).
(function () {
  "use strict";
  function typing(target) {
    var tag = target && target.tagName;
    return tag === "INPUT" && target.type !== "radio" && target.type !== "checkbox" || tag === "TEXTAREA" ||
      tag === "SELECT" || (target && target.isContentEditable);
  }
  function send(form) {
    if (!form) { return; }
    if (form.requestSubmit) { form.requestSubmit(); } else { form.submit(); }
  }
  function choose(form, key) {
    var radio = form && form.querySelector('input[type=radio][data-key="' + key + '"]');
    if (radio) { radio.checked = true; radio.focus(); }
    return radio;
  }
  document.addEventListener("keydown", function (event) {
    var form = document.getElementById("label-form");
    if (typing(event.target)) {
      if (event.target.id === "reply") {
        if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); send(form); }
        else if (event.key === "Escape") { event.target.blur(); }
      }
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    if ((event.key >= "1" && event.key <= "9") || event.key === "t") {
      if (choose(form, event.key)) { event.preventDefault(); }
    } else if (event.key === "Enter") {
      if (form) { event.preventDefault(); send(form); }
    } else if (event.key === "e") {
      var reply = document.getElementById("reply");
      if (reply) { event.preventDefault(); reply.focus(); }
    } else if (event.key === "s") {
      send(document.getElementById("skip-form"));
    } else if (event.key === "u") {
      send(document.getElementById("undo-form"));
    }
  });
})();
