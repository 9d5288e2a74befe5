// `sqlx::migrate!` embeds the migrations at compile time: a new or changed file must
// rebuild this crate (sqlx's own advice).
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
