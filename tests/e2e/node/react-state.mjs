// Just enough of React's useState to run the guide's hook outside a renderer: the setter takes a
// value or an updater, as React's does; each state cell keeps every value it was set to.
export const cells = [];

export function useState(initial) {
  const cell = { value: initial, states: [] };
  cells.push(cell);
  const set = (next) => {
    cell.value = typeof next === "function" ? next(cell.value) : next;
    cell.states.push(cell.value);
  };
  return [cell.value, set];
}
