// A file the page made (a profile, a detection table) handed to the browser's download.
export function saveText(name, text, type) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], { type }));
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  // the browser reads the blob after the click returns
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}
