// Keyboard-first labeling: 1-9 choose a label, Enter submits, s skips, u undoes the last submission.
// Served from /static (the Content-Security-Policy allows no inline script).
(function () {
  "use strict";
  function typing(target) {
    var tag = target && target.tagName;
    return tag === "INPUT" && target.type !== "radio" || tag === "TEXTAREA" || tag === "SELECT" ||
      (target && target.isContentEditable);
  }
  function send(form) {
    if (!form) { return; }
    if (form.requestSubmit) { form.requestSubmit(); } else { form.submit(); }
  }
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) { return; }
    var form = document.getElementById("label-form");
    if (event.key >= "1" && event.key <= "9") {
      var radio = form && form.querySelector('input[type=radio][data-key="' + event.key + '"]');
      if (radio) { radio.checked = true; radio.focus(); event.preventDefault(); }
    } else if (event.key === "Enter") {
      if (form) { event.preventDefault(); send(form); }
    } else if (event.key === "s") {
      send(document.getElementById("skip-form"));
    } else if (event.key === "u") {
      send(document.getElementById("undo-form"));
    }
  });
})();
