// Draw the Mermaid diagram of the graph page. securityLevel "strict": labels are text.
document.addEventListener("DOMContentLoaded", async () => {
  if (!window.mermaid) return;
  window.mermaid.initialize({ startOnLoad: false, securityLevel: "strict", theme: "neutral" });
  await window.mermaid.run({ querySelector: "pre.mermaid" });
  document.body.dataset.graph = "drawn";
});
