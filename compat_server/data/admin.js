// sms-compat dashboard: refresh the live part of the page in place (no framework).
(function () {
  "use strict";
  var body = document.body;
  var every = parseInt(body.getAttribute("data-refresh"), 10) || 2000;
  var live = document.getElementById("live");
  var stamp = document.getElementById("updated");
  var form = document.getElementById("filters");

  form.addEventListener("change", function () { form.submit(); });

  function refresh() {
    fetch("/admin/fragment" + window.location.search, {
      credentials: "same-origin",
      cache: "no-store",
    }).then(function (response) {
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return response.text();
    }).then(function (html) {
      live.innerHTML = html;
      stamp.textContent = "updated " + new Date().toLocaleTimeString();
      stamp.className = "";
    }).catch(function (error) {
      stamp.textContent = "not updated: " + error.message;
      stamp.className = "stale";
    }).finally(function () {
      window.setTimeout(refresh, every);
    });
  }
  window.setTimeout(refresh, every);
})();
