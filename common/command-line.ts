/**
 * How the three commands (server, worker, admin) drive commander from their option tables.
 *
 * Commander tokenises the command line, rejects unknown options (suggesting the nearest one),
 * dispatches subcommands and writes every `--help`. Each command keeps its own table as the single
 * source of its options, and resolves values itself: the flag, else its env var, else its default,
 * checked by the command's own rules. Env vars are read from the environment the caller passes (the
 * tests pass their own), so commander is not told them (no `.env()`, which reads process.env): help
 * shows them from the table.
 *
 * Commander is made to throw instead of exiting or printing, so the caller chooses the stream and
 * the exit code, and a test can run a command in process.
 */
import { Command, CommanderError, type HelpConfiguration, Option } from "commander";

/** Help is wrapped to this width whatever the terminal, so it reads the same everywhere. */
const HELP_WIDTH = 100;

/** One row of an option table, as help shows it. */
export interface OptionDeclaration {
  /** The long flag, without its dashes. */
  flag: string;
  /** A one-letter alias, without its dash. */
  short?: string;
  /** How help shows the value, e.g. "URL"; absent for a switch that takes none. */
  value?: string;
  description: string;
  env?: string;
  /** The default, as help shows it. */
  defaultText?: string;
  /** True, or when it is required, e.g. "required with --engine openai". */
  required?: boolean | string;
}

/**
 * A commander option for one row of an option table. Whether it is required, its env var and its
 * default go on a line of their own under the description, where they are easy to find.
 */
export function declareOption(declaration: OptionDeclaration): Option {
  const { flag, short, value, description, env, defaultText, required } = declaration;
  const notes = [
    required === true ? "required" : required || undefined,
    env ? `env: ${env}` : undefined,
    defaultText !== undefined ? `default: ${defaultText}` : undefined,
  ].filter((note) => note !== undefined);
  const flags = `${short ? `-${short}, ` : ""}--${flag}${value ? ` <${value}>` : ""}`;
  return new Option(flags, notes.length > 0 ? `${description}\n(${notes.join("; ")})` : description);
}

/** What a command line asked for. */
export type CommandLine =
  /** Options to run with: `command` is the (sub)command chosen, its operands are in `command.args`. */
  | { kind: "parsed"; command: Command }
  /** Help, printed on request (`--help`) or because the command line named no command (`error`). */
  | { kind: "help"; text: string; error: boolean }
  /** A usage error; the message names the option or argument and says what is wrong. */
  | { kind: "usage-error"; message: string };

/** Text commander would have printed, kept for the caller. */
interface Captured {
  out: string;
  err: string;
}

const captures = new WeakMap<Command, Captured>();

/**
 * A program that reports to {@link parseCommandLine} instead of printing or exiting. Subcommands
 * made with `.command(name)` inherit all of this, `-h, --help` included. `help` adds to (or
 * overrides) how help is laid out.
 */
export function newProgram(name: string, help: HelpConfiguration = {}): Command {
  const captured: Captured = { out: "", err: "" };
  const program = new Command(name)
    .exitOverride()
    .configureOutput({
      writeOut: (text) => {
        captured.out += text;
      },
      writeErr: (text) => {
        captured.err += text;
      },
      // The error's message is returned in the CommandLine; the caller prints it.
      outputError: () => undefined,
    })
    .configureHelp({ helpWidth: HELP_WIDTH, ...help })
    .helpOption("-h, --help", "show this help")
    // Operands are checked by the caller, whose message names the one that is not expected.
    .allowExcessArguments(true)
    .showSuggestionAfterError(true);
  captures.set(program, captured);
  return program;
}

/** The text of a command's help, with what `addHelpText` adds around it. */
export function helpText(command: Command): string {
  const captured = captures.get(rootOf(command));
  if (!captured) throw new Error(`${command.name()} was not made by newProgram()`);
  const before = captured.out;
  command.outputHelp();
  const text = captured.out.slice(before.length);
  captured.out = before;
  return text;
}

/** Parses `argv` (the arguments after the program's own words) against `program`. */
export function parseCommandLine(program: Command, argv: readonly string[]): CommandLine {
  const captured = captures.get(program);
  if (!captured) throw new Error(`${program.name()} was not made by newProgram()`);
  captured.out = "";
  captured.err = "";
  // The command that parses last is the one chosen: the program, or the subcommand it names.
  let chosen: Command = program;
  const watch = (command: Command): void => {
    command.hook("preSubcommand", (_parent, subcommand) => {
      chosen = subcommand;
    });
    for (const subcommand of command.commands) watch(subcommand);
  };
  watch(program);
  try {
    program.parse([...argv], { from: "user" });
  } catch (error) {
    if (!(error instanceof CommanderError)) throw error;
    if (error.code === "commander.helpDisplayed" || error.code === "commander.help") {
      const toStderr = captured.err !== "";
      return { kind: "help", text: toStderr ? captured.err : captured.out, error: toStderr };
    }
    // One line: commander puts its "(Did you mean --x?)" on a line of its own.
    let message = error.message.replace(/^error: /, "").replace(/\s*\n\s*/g, " ");
    // Commander names only the word it did not know; say which group it was looked for in.
    if (error.code === "commander.unknownCommand" && chosen !== program) {
      message = message.replace(/^unknown command '/, `unknown command '${wordsBelow(program, chosen)} `);
    }
    return { kind: "usage-error", message };
  }
  return { kind: "parsed", command: chosen };
}

/**
 * The value `--flag` was given on the command line, looked up on `command` and then on its
 * ancestors (a program's options are accepted after its subcommands too).
 */
export function givenValue(command: Command, flag: string): string | boolean | undefined {
  for (let at: Command | null = command; at !== null; at = at.parent) {
    const option = at.options.find((candidate) => candidate.long === `--${flag}`);
    if (option) return at.getOptionValue(option.attributeName()) as string | boolean | undefined;
  }
  return undefined;
}

/** The words that name `command` under `program`, e.g. "account create". */
function wordsBelow(program: Command, command: Command): string {
  const words: string[] = [];
  for (let at: Command | null = command; at !== null && at !== program; at = at.parent)
    words.unshift(at.name());
  return words.join(" ");
}

function rootOf(command: Command): Command {
  let root = command;
  while (root.parent) root = root.parent;
  return root;
}
