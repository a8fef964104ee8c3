// The Fledge dashboard's only script (docs/dashboard.md): no framework, no build step.
//
// 1. On the login page, `#token=...` (and `&next=/ui/...`) in the URL fragment logs in: the
//    fragment is never sent to a server, so the token stays out of logs; it is removed from
//    the address bar and posted with the login form.
// 2. Every element with `data-live="URL"` is refreshed from URL (a server-rendered HTML
//    fragment) every few seconds, until the fragment it holds says `data-final="true"`.
'use strict';

(function () {
  var REFRESH_MS = 3000;

  function loginFromFragment() {
    var form = document.getElementById('login');
    if (!form || !window.location.hash) {
      return;
    }
    var params = new URLSearchParams(window.location.hash.slice(1));
    window.history.replaceState(null, '', window.location.pathname + window.location.search);
    var token = params.get('token');
    if (!token) {
      return;
    }
    form.elements.token.value = token;
    var next = params.get('next');
    if (next) {
      form.elements.next.value = next;
    }
    form.submit();
  }

  function isFinal(element) {
    var fragment = element.querySelector('[data-final]');
    return fragment !== null && fragment.getAttribute('data-final') === 'true';
  }

  // Which log tails are open, so that a refresh keeps them open.
  function openDetails(element) {
    var open = [];
    element.querySelectorAll('tr[data-task] details[open]').forEach(function (d) {
      open.push(d.closest('tr').getAttribute('data-task'));
    });
    return open;
  }

  function reopen(element, open) {
    element.querySelectorAll('tr[data-task]').forEach(function (row) {
      if (open.indexOf(row.getAttribute('data-task')) >= 0) {
        var details = row.querySelector('details');
        if (details) {
          details.open = true;
        }
      }
    });
  }

  function live(element) {
    var source = element.getAttribute('data-live');
    function tick() {
      fetch(source, { credentials: 'same-origin', cache: 'no-store' })
        .then(function (response) {
          if (response.status === 401) {
            window.location.href = '/ui/login?next=' + encodeURIComponent(window.location.pathname);
            return null;
          }
          if (!response.ok) {
            throw new Error('HTTP ' + response.status);
          }
          return response.text();
        })
        .then(function (html) {
          if (html === null) {
            return;
          }
          var open = openDetails(element);
          // Server-rendered, every user string escaped; the CSP runs no inline script.
          element.innerHTML = html;
          reopen(element, open);
          element.setAttribute('data-refreshed', String(Date.now()));
        })
        .catch(function () {
          element.setAttribute('data-stale', 'true');
        })
        .then(function () {
          if (!isFinal(element)) {
            window.setTimeout(tick, REFRESH_MS);
          }
        });
    }
    if (!isFinal(element)) {
      window.setTimeout(tick, REFRESH_MS);
    }
  }

  loginFromFragment();
  document.querySelectorAll('[data-live]').forEach(live);
})();
