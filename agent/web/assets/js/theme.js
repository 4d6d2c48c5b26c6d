// Dark by default; the choice is remembered per browser. Charts rebuild
// their colours on the "themechange" event.
const KEY = "veloflux.theme";

function apply(theme) {
  document.documentElement.dataset.theme = theme;
  const btn = document.querySelector("#theme-toggle");
  if (btn) btn.textContent = theme === "dark" ? "Light" : "Dark";
}

export function setupTheme() {
  let theme = "dark";
  try {
    theme = localStorage.getItem(KEY) === "light" ? "light" : "dark";
  } catch {
    /* storage disabled */
  }
  apply(theme);
  document.querySelector("#theme-toggle")?.addEventListener("click", () => {
    const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    apply(next);
    try {
      localStorage.setItem(KEY, next);
    } catch {
      /* storage disabled */
    }
    document.dispatchEvent(new Event("themechange"));
  });
}
